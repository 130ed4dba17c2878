from pathlib import Path

import numpy as np
import torch

from echoflow.config import load_config
from echoflow.data.echonet import VideoRecord
from echoflow.data.phantom import generate_cohort
from echoflow.data.sites import SiteData, load_sites
from echoflow.stages.data import REID_TWINS, with_twins
from echoflow.study.centralized import train_stage


def test_twins_are_more_visits_of_the_same_patient() -> None:
    video = np.random.default_rng(0).integers(0, 256, (4, 16, 16), dtype=np.uint8)
    record = VideoRecord("v", None, 50.0, 40.0, 80.0, 25.0, 4, 16, 16, "TRAIN", "P1", "s")  # type: ignore[arg-type]
    site = SiteData("s", [record], [video], {"P1": 0})
    twins = with_twins([site], seed=0)[0]
    assert len(twins.videos) == 1 + len(REID_TWINS) and all(r.patient_id == "P1" for r in twins.records)
    assert np.array_equal(twins.videos[0], video)
    assert np.array_equal(twins.videos[1 + REID_TWINS.index("mirror")], video[..., ::-1])
    assert all(not np.array_equal(twin, video) for twin in twins.videos[1:])


def test_train_stage_starts_from_the_seed_whatever_ran_before(tmp_path: Path) -> None:
    roots = generate_cohort(tmp_path / "cohort", sites=1, patients_per_site=3, seed=0, size=32, frames=32)
    cfg = load_config(["data.size=32", "model.ef.channels=[4,8,8,8]", "train.ef.optim.steps=2",
                       "train.ef.optim.batch_size=2", f"workdir={tmp_path}"])
    sites = load_sites(roots, size=32)
    first = train_stage("ef", cfg, sites, out=tmp_path / "first", quiet=True)
    torch.rand(1000)  # e.g. sampling or the audit drew random numbers in between
    second = train_stage("ef", cfg, sites, out=tmp_path / "second", quiet=True)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
