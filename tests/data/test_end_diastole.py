"""The image flow's end-diastolic frames: read from VolumeTracings.csv, checked against the phantom's LV masks."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from echoflow.data.echonet import end_diastolic_frames
from echoflow.data.phantom import read_lv_masks, write_site
from echoflow.data.sites import load_sites
from echoflow.errors import EchoFlowError
from echoflow.stages.data import image_flow_frames


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_site(tmp_path_factory.mktemp("ed"), site=0, patients=4, seed=3, size=32, frames=32)


def test_end_diastolic_frame_is_the_largest_cavity(site: Path) -> None:
    ed = end_diastolic_frames(site)
    table = pd.read_csv(site / "FileList.csv")
    assert set(ed) == set(table.FileName)
    for name, frame in ed.items():
        area = read_lv_masks(site / "Videos" / f"{name}.avi").sum(axis=(1, 2))
        assert area[frame] >= area.max() - 1  # ties: the LV rests at its full size in late diastole
        assert area[frame] > area.min() + 10


def test_image_flow_learns_ed_frames_and_reports_untraced_videos(site: Path, tmp_path: Path) -> None:
    sites = load_sites([site], size=32, splits=["TRAIN", "VAL", "TEST"])
    assert image_flow_frames(sites, "all") == sites
    ed = end_diastolic_frames(site)
    picked = image_flow_frames(sites, "end_diastole")[0]
    assert len(picked.videos) == len(sites[0].videos)
    for record, frames, video in zip(picked.records, picked.videos, sites[0].videos, strict=True):
        i = ed[record.file_name]
        np.testing.assert_array_equal(frames, video[max(0, i - 1): i + 2])

    tracings = pd.read_csv(site / "VolumeTracings.csv")
    dropped = sites[0].records[0].file_name
    tracings[tracings.FileName != f"{dropped}.avi"].to_csv(site / "VolumeTracings.csv", index=False)
    try:
        picked = image_flow_frames(sites, "end_diastole")[0]
    finally:
        tracings.to_csv(site / "VolumeTracings.csv", index=False)
    assert dropped not in [r.file_name for r in picked.records]
    assert len(picked.records) == len(sites[0].records) - 1
    assert any(dropped in line and "VolumeTracings" in line for line in picked.problems)


def test_untraced_site_and_unknown_choice_are_refused(site: Path, tmp_path: Path) -> None:
    sites = load_sites([site], size=32, splits=["TRAIN"])
    with pytest.raises(EchoFlowError, match="choose one of all, end_diastole"):
        image_flow_frames(sites, "systole")
    (site / "VolumeTracings.csv").rename(tmp_path / "saved.csv")
    try:
        with pytest.raises(EchoFlowError, match=r"site_00: train\.image_flow\.frames=end_diastole needs"):
            image_flow_frames(sites, "end_diastole")
    finally:
        (tmp_path / "saved.csv").rename(site / "VolumeTracings.csv")
