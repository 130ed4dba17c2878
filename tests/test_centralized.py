import numpy as np

from echoflow.centralized import REID_TWINS, with_twins
from echoflow.data.echonet import VideoRecord
from echoflow.data.sites import SiteData


def test_twins_are_more_visits_of_the_same_patient() -> None:
    video = np.random.default_rng(0).integers(0, 256, (4, 16, 16), dtype=np.uint8)
    record = VideoRecord("v", None, 50.0, 40.0, 80.0, 25.0, 4, 16, 16, "TRAIN", "P1", "s")  # type: ignore[arg-type]
    site = SiteData("s", [record], [video], {"P1": 0})
    twins = with_twins([site], seed=0)[0]
    assert len(twins.videos) == 1 + len(REID_TWINS) and all(r.patient_id == "P1" for r in twins.records)
    assert np.array_equal(twins.videos[0], video)
    assert np.array_equal(twins.videos[1 + REID_TWINS.index("mirror")], video[..., ::-1])
    assert all(not np.array_equal(twin, video) for twin in twins.videos[1:])
