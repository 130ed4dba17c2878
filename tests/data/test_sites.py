from pathlib import Path

import numpy as np
import pytest
import torch

from echoflow.data.echonet import VideoRecord
from echoflow.data.sites import (
    ClipDataset,
    FrameDataset,
    PatientPairDataset,
    SiteData,
    balanced_batches,
    ef_balance_weights,
    load_site,
    load_sites,
    split_sites,
)
from echoflow.errors import EchoFlowError
from tests.data.test_echonet import make_site, zero_frame_avi


def pixel(value: torch.Tensor) -> int:
    """Undo the [-1, 1] scaling of one pixel."""
    return round((float(value) + 1.0) * 127.5)


@pytest.fixture
def two_sites(tmp_path: Path) -> list[Path]:
    a = make_site(tmp_path / "site_00", [
        {"FileName": "a0", "EF": 60.0, "PatientID": "p0"},
        {"FileName": "a1", "EF": 55.0, "PatientID": "p0"},
        {"FileName": "a2", "EF": 35.0, "PatientID": "p1"},
        {"FileName": "a3", "EF": 45.0, "PatientID": "p1", "Split": "TEST"},
    ])
    b = make_site(tmp_path / "site_01", [
        {"FileName": "b0", "EF": 70.0, "PatientID": "p2"},
        {"FileName": "b1", "EF": 25.0, "PatientID": "p0"},  # a patient seen at both sites
    ], first=4)
    return [a, b]


def test_bad_videos_become_problems_and_good_ones_load(tmp_path: Path) -> None:
    root = make_site(tmp_path / "s", [{"FileName": f"v{i}", "EF": 50.0} for i in range(4)])
    data = (root / "Videos" / "v1.avi").read_bytes()
    (root / "Videos" / "v1.avi").write_bytes(data[: len(data) // 3])
    zero_frame_avi(root / "Videos" / "v2.avi")
    site = load_site(root, size=32)
    assert [r.file_name for r in site.records] == ["v0", "v3"]
    assert [v.shape for v in site.videos] == [(32, 32, 32)] * 2 and site.videos[0].dtype == np.uint8
    assert len(site.problems) == 2
    assert any("v1.avi" in p for p in site.problems) and any("v2.avi: video has no frames" in p for p in site.problems)


def test_load_sites_share_one_patient_index(two_sites: list[Path]) -> None:
    sites = load_sites(two_sites, size=64, splits=("train", "TEST"))
    assert [s.name for s in sites] == ["site_00", "site_01"] and [s.index for s in sites] == [0, 1]
    assert sites[0].patient_index is sites[1].patient_index
    assert sites[0].patient_index == {"p0": 0, "p1": 1, "p2": 2}
    assert [s.first_video for s in sites] == [0, 4]
    only_train = load_site(two_sites[0], size=64)
    assert [r.file_name for r in only_train.records] == ["a0", "a1", "a2"]


def test_frame_dataset_fields(two_sites: list[Path]) -> None:
    dataset = FrameDataset(load_sites(two_sites, size=64))
    assert len(dataset) == 5 * 32
    item = dataset[32 * 4 + 7]  # site_01, its second video (b1), frame 7
    assert item["frame"].shape == (1, 64, 64) and item["frame"].dtype == torch.float32
    assert -1.0 <= float(item["frame"].min()) and float(item["frame"].max()) <= 1.0
    assert pixel(item["frame"][0, 0, 0]) == 7 * 4 and pixel(item["frame"][0, 0, 1]) == 5 * 8
    assert item["ef"].dtype == torch.float32 and float(item["ef"]) == 25.0
    assert (int(item["patient"]), int(item["site"]), int(item["video"])) == (0, 1, 4)
    assert all(item[k].shape == () and item[k].dtype == torch.int64 for k in ("patient", "site", "video"))


def test_clip_dataset_samples_at_the_clip_fps(two_sites: list[Path]) -> None:
    sites = load_sites(two_sites, size=64)
    fixed = ClipDataset(sites, frames=16, fps=12.5, random_start=False)
    assert len(fixed) == 5
    item = fixed[0]
    assert item["clip"].shape == (1, 16, 64, 64) and item["clip"].dtype == torch.float32
    assert [pixel(v) // 4 for v in item["clip"][0, :, 0, 0]] == list(range(0, 31, 2))
    moving = ClipDataset(sites, frames=8, fps=25 / 3)
    clips = [moving[1]["clip"][0, :, 0, 0] for _ in range(300)]
    starts = {pixel(clip[0]) // 4 for clip in clips}
    assert starts == set(range(32 - 22 + 1))  # span 22: every legal start is drawn, none past the end
    assert all([pixel(v) // 4 for v in clip] == list(range(s, s + 22, 3))
               for clip, s in zip(clips, (pixel(c[0]) // 4 for c in clips), strict=True))
    with pytest.raises(EchoFlowError, match=r"17 frames at 12\.5 fps"):
        ClipDataset(sites, frames=17, fps=12.5)


def test_pairs_are_same_patient_from_different_visits(two_sites: list[Path]) -> None:
    sites = load_sites(two_sites, size=64, splits=("TRAIN", "TEST"))
    dataset = PatientPairDataset(sites)
    video_patient = {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 0}  # video number (pixel (0, 1) / 8) -> patient
    partners: dict[int, set[int]] = {}
    for _ in range(20):
        for index in range(len(dataset)):
            item = dataset[index]
            assert item["a"].shape == item["b"].shape == (1, 64, 64) and item["patient"].dtype == torch.int64
            a_video, b_video = pixel(item["a"][0, 0, 1]) // 8, pixel(item["b"][0, 0, 1]) // 8
            assert a_video == index and video_patient[b_video] == video_patient[a_video] == int(item["patient"])
            partners.setdefault(a_video, set()).add(b_video)
    assert partners == {0: {1, 5}, 1: {0, 5}, 2: {3}, 3: {2}, 4: {4}, 5: {0, 1}}


def records(n_patients: int, *, seed: int = 0) -> list[VideoRecord]:
    rng = np.random.default_rng(seed)
    return [VideoRecord(f"p{p}_{v}", Path(f"p{p}_{v}.avi"), float(ef + rng.normal(0, 2)), 40.0, 100.0, 25.0, 32,
                        64, 64, "TRAIN", f"p{p}", "pool")
            for p, ef in enumerate(rng.uniform(20, 75, n_patients)) for v in range(3)]


@pytest.mark.parametrize("alpha", [None, 0.1])
def test_split_sites_keeps_patients_together(alpha: float | None) -> None:
    pooled = records(120)
    sites = split_sites(pooled, 4, alpha=alpha, seed=1)
    assert sorted(r.file_name for site in sites for r in site) == sorted(r.file_name for r in pooled)
    owners: dict[str, set[int]] = {}
    for number, site in enumerate(sites):
        assert site
        for record in site:
            owners.setdefault(record.patient_id, set()).add(number)
    assert all(len(s) == 1 for s in owners.values())
    assert split_sites(pooled, 4, alpha=alpha, seed=1) == sites


def test_non_iid_skews_ef_per_site() -> None:
    pooled = records(200)

    def spread(alpha: float | None) -> float:
        return float(np.mean([np.std([np.mean([r.ef for r in site]) for site in split_sites(pooled, 4, alpha=alpha,
                                                                                            seed=seed)])
                              for seed in range(5)]))

    iid, skewed = spread(None), spread(0.1)
    assert iid < 3.0 and skewed > 3 * iid


def test_latent_sites_yield_channels_first(two_sites: list[Path]) -> None:
    site = load_site(two_sites[0], size=64)
    latents = [np.random.default_rng(i).normal(size=(len(v), 4, 16, 16)).astype(np.float32)
               for i, v in enumerate(site.videos)]
    site.videos = latents
    frame = FrameDataset([site])[33]["frame"]  # video 1, frame 1
    torch.testing.assert_close(frame, torch.from_numpy(latents[1][1]))
    clip = ClipDataset([site], frames=4, fps=12.5, random_start=False)[0]["clip"]
    assert clip.shape == (4, 4, 16, 16)
    torch.testing.assert_close(clip[:, 3], torch.from_numpy(latents[0][6]))


def _clip_sites(efs: list[float]) -> list[SiteData]:
    records = [VideoRecord(f"v{i}", Path(f"v{i}.avi"), ef, 0.0, 0.0, 25.0, 8, 4, 4, "TRAIN", f"p{i}", "s")
               for i, ef in enumerate(efs)]
    videos = [np.full((8, 4, 4), i % 256, np.uint8) for i in range(len(efs))]
    return [SiteData("s", records, videos, {f"p{i}": i for i in range(len(efs))})]


def test_ef_balance_weights_give_every_bin_the_same_mass() -> None:
    ef = [55.0] * 90 + [18.0] * 6 + [77.0] * 3 + [float("nan")]
    weights = ef_balance_weights(ef, bin_width=10.0)
    assert weights.mean() == pytest.approx(1.0)
    masses = [weights[:90].sum(), weights[90:96].sum(), weights[96:99].sum(), weights[99:].sum()]
    assert masses == pytest.approx([masses[0]] * 4)


def test_balanced_batches_draw_the_tails_as_often_as_the_middle() -> None:
    efs = [55.0] * 90 + [18.0] * 6 + [77.0] * 4
    dataset = ClipDataset(_clip_sites(efs), frames=4, fps=25.0)
    torch.manual_seed(0)
    draw = balanced_batches(dataset, batch_size=50)
    batches = [draw() for _ in range(60)]
    drawn, videos = torch.cat([b["ef"] for b in batches]), torch.cat([b["video"] for b in batches])
    shares = [float((drawn == ef).float().mean()) for ef in (55.0, 18.0, 77.0)]
    assert shares == pytest.approx([1 / 3] * 3, abs=0.03)  # uniform draws would give 0.90 / 0.06 / 0.04
    assert set(videos[drawn == 77.0].tolist()) == {96, 97, 98, 99}  # every tail video, not one repeated
