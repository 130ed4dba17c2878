"""Exports: EchoNet-Dynamic's own loading steps read the EchoNet export; pydicom reads the DICOM export."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import config as dicom_config
from typer.testing import CliRunner

from echoflow.cli import app
from echoflow.data.echonet import read_avi, read_cohort
from echoflow.data.export import SYNTHETIC_MARKER, export_dicom, export_echonet
from echoflow.data.ingest import ingest_dicom
from echoflow.data.phantom import write_site
from echoflow.errors import EchoFlowError
from echoflow.study.generate import write_synthetic


@pytest.fixture
def released(tmp_path: Path) -> Path:
    """Five generated videos of odd sizes (T, H, W) = (17, 48, 40) with requested EFs, as `echoflow sample` writes."""
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, (5, 17, 48, 40), dtype=np.uint8)
    write_synthetic(tmp_path / "released", videos, np.array([25.0, 40.5, 55.0, 62.25, 71.0]), fps=12.5)
    return tmp_path / "released"


def echonet_load(root: Path, split: str) -> dict[str, tuple[np.ndarray, float]]:
    """EchoNet-Dynamic's `Echo.__init__` + `utils.loadvideo` steps (echonet/dynamic e01d029), target EF.

    Returns {video file: ((3, F, H, W) uint8 video, EF)} for every video their loader would keep.
    """
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (dev extra) decodes as EchoNet-Dynamic does")
    with open(os.path.join(root, "FileList.csv")) as f:
        data = pd.read_csv(f)
    data["Split"].map(lambda x: x.upper())  # their no-op: Split must already be upper case
    data = data[data["Split"] == split.upper()]
    header = data.columns.tolist()
    fnames = [fn + ".avi" for fn in data["FileName"].tolist() if os.path.splitext(fn)[1] == ""]
    outcome = data.values.tolist()
    missing = set(fnames) - set(os.listdir(os.path.join(root, "Videos")))
    assert not missing, missing
    frames: dict[str, list[int]] = collections.defaultdict(list)
    trace: dict[str, dict[int, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
    with open(os.path.join(root, "VolumeTracings.csv")) as f:
        assert f.readline().strip().split(",") == ["FileName", "X1", "Y1", "X2", "Y2", "Frame"]
        for line in f:
            filename, x1, y1, x2, y2, frame = line.strip().split(",")
            if int(frame) not in trace[filename]:
                frames[filename].append(int(frame))
            trace[filename][int(frame)].append((float(x1), float(y1), float(x2), float(y2)))
    keep = [len(frames[f]) >= 2 for f in fnames]
    fnames = [f for f, k in zip(fnames, keep, strict=True) if k]
    outcome = [o for o, k in zip(outcome, keep, strict=True) if k]
    loaded = {}
    for name, row in zip(fnames, outcome, strict=True):
        capture = cv2.VideoCapture(os.path.join(root, "Videos", name))
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        video = np.zeros((count, height, width, 3), np.uint8)
        for i in range(count):
            ok, frame = capture.read()
            assert ok, f"Failed to load frame #{i} of {name}."
            video[i] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        loaded[name] = (video.transpose((3, 0, 1, 2)), float(np.float32(row[header.index("EF")])))
    return loaded


def test_echonet_loader_reads_every_exported_video(released: Path, tmp_path: Path) -> None:
    result = export_echonet(released, tmp_path / "echonet")
    source = {r.file_name + ".avi": r for r in read_cohort(released).records}
    loaded = {**echonet_load(tmp_path / "echonet", "train"), **echonet_load(tmp_path / "echonet", "val")}
    assert set(loaded) == set(source) and len(result.files) == 5 and result.placeholder_traces == 5
    for name, (video, ef) in loaded.items():
        frames = read_avi(source[name].path)
        assert video.shape == (3, 17, 48, 40) == (3, *frames.shape)
        assert np.array_equal(video[0], frames) and np.array_equal(video[2], frames)  # lossless, gray in all 3
        assert ef == pytest.approx(source[name].ef, abs=1e-4)


def test_echonet_export_keeps_real_tracings_and_drops_dotted_names(tmp_path: Path) -> None:
    site = write_site(tmp_path / "phantom", site=0, patients=2, seed=0, size=32, frames=12)
    table = pd.read_csv(site / "FileList.csv")
    dotted = table.loc[0, "FileName"]
    os.rename(site / "Videos" / f"{dotted}.avi", site / "Videos" / "a.b.avi")
    table.loc[0, "FileName"] = "a.b"
    table.to_csv(site / "FileList.csv", index=False)
    result = export_echonet(site, tmp_path / "out")
    assert len(result.skipped) == 1 and "a.b" in result.skipped[0] and result.placeholder_traces == 0
    exported = pd.read_csv(tmp_path / "out" / "VolumeTracings.csv")
    original = pd.read_csv(site / "VolumeTracings.csv")
    assert len(exported) == (original["FileName"] != f"{dotted}.avi").sum()
    loaded = {name for split in ("train", "val", "test") for name in echonet_load(tmp_path / "out", split)}
    assert loaded == {f"{n}.avi" for n in table["FileName"][1:]}


def test_dicom_round_trip_is_pixel_exact_and_marked_synthetic(released: Path, tmp_path: Path) -> None:
    dicom_config.settings.writing_validation_mode = dicom_config.RAISE  # pydicom validates every value it writes
    try:
        result = export_dicom(released, tmp_path / "dicom")
    finally:
        dicom_config.settings.writing_validation_mode = dicom_config.WARN
    records = read_cohort(released).records
    uids = set()
    for record, path in zip(records, result.files, strict=True):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == pydicom.uid.UltrasoundMultiFrameImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert np.array_equal(ds.pixel_array, read_avi(record.path))
        assert (ds.PhotometricInterpretation, ds.BitsStored, int(ds.NumberOfFrames)) == ("MONOCHROME2", 8, 17)
        assert float(ds.FrameTime) == pytest.approx(80.0) and int(ds.CineRate) == 12
        assert str(ds.PatientName).startswith("SYNTHETIC^") and ds.BurnedInAnnotation == "NO"
        assert SYNTHETIC_MARKER in ds.SeriesDescription and f"EF {record.ef:.1f} %" in ds.ImageComments
        assert "PatientBirthDate" in ds and not ds.PatientBirthDate and not ds.StudyDate
        uids |= {ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID}
    assert len(uids) == 15 and all(u.startswith(pydicom.uid.PYDICOM_ROOT_UID) for u in uids)


def test_our_own_ingest_reads_the_dicom_export_back(released: Path, tmp_path: Path) -> None:
    export_dicom(released, tmp_path / "dicom")
    rng = np.random.default_rng(1)
    square = tmp_path / "square"
    write_synthetic(square, rng.integers(0, 256, (2, 9, 32, 32), dtype=np.uint8), np.array([50.0, 60.0]), fps=25)
    export_dicom(square, tmp_path / "dicom_sq")
    report = ingest_dicom(tmp_path / "dicom_sq", tmp_path / "ingested", salt="site-secret-16-bytes", size=32)
    assert len(report.records) == 2 and not report.skipped
    back = sorted(read_avi(r.path).tobytes() for r in report.records)
    assert back == sorted(read_avi(r.path).tobytes() for r in read_cohort(square).records)
    assert {r.fps for r in report.records} == {25.0}


def test_cli_exports_and_refuses_a_folder_without_dataset(released: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for kind in ("echonet", "dicom"):
        result = runner.invoke(app, ["export", kind, str(released), "--out", str(tmp_path / kind)])
        assert result.exit_code == 0, result.output
        assert "exported 5" in result.output
    assert len(list((tmp_path / "dicom").glob("*.dcm"))) == 5
    with pytest.raises(EchoFlowError, match="not an EchoNet-style dataset"):
        export_dicom(tmp_path / "dicom", tmp_path / "again")
    with pytest.raises(EchoFlowError, match="must differ"):
        export_echonet(released, released)
