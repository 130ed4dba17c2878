"""Hostile inputs: every bad file gives one line naming it and is skipped; every good sample still loads.

The fuzz set is built in ``tmp_path`` at test time (no binary fixtures): each case adds one hostile file (or
FileList row) next to good ones and names the words its one problem line must hold.
"""

import math
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import UID
from typer.testing import CliRunner

from echoflow.cli import app
from echoflow.data.dicom import read_ultrasound
from echoflow.data.echonet import MAX_SIDE, read_avi, write_avi
from echoflow.data.sites import load_site
from echoflow.errors import EchoFlowError
from tests.data.test_dicom import scan, write_us
from tests.data.test_echonet import make_site, video_pixels, zero_frame_avi

GOOD_VIDEOS = 3
Row = dict[str, object]


def patched_avi(path: Path, *, frames: int | None = None, size: int | None = None) -> Path:
    """A valid 8-frame FFV1 AVI whose header then claims ``frames`` frames and/or ``size`` x ``size`` pixels.

    The AVI main header (``avih``) holds dwTotalFrames at +16 and dwWidth/dwHeight at +32; the stream header
    (``strh``) dwLength at +32; the stream format (``strf``, a BITMAPINFOHEADER) biWidth/biHeight at +4.
    """
    write_avi(path, video_pixels(9, frames=8, size=32), fps=25)
    data = bytearray(path.read_bytes())
    avih, strh, strf = (data.find(tag) + 8 for tag in (b"avih", b"strh", b"strf"))
    if frames is not None:
        struct.pack_into("<I", data, avih + 16, frames)
        struct.pack_into("<I", data, strh + 32, frames)
    if size is not None:
        struct.pack_into("<II", data, avih + 32, size, size)
        struct.pack_into("<ii", data, strf + 4, size, size)
    path.write_bytes(bytes(data))
    return path


def truncated(path: Path) -> None:
    write_avi(path, np.random.default_rng(0).integers(0, 256, (8, 32, 32), dtype=np.uint8), fps=25)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def outside_link(path: Path) -> None:
    """A link to a perfectly good video outside the data folder: it would load if links were followed out."""
    write_avi(path.parents[2] / "elsewhere.avi", video_pixels(9, frames=32, size=32), fps=25)
    path.symlink_to(path.parents[2] / "elsewhere.avi")


def fifo(path: Path) -> None:
    os.mkfifo(path)  # opening it for reading would block forever


# case -> (what to do to Videos/bad.avi, the bad FileList row, words of its one problem line)
SITE_FUZZ: dict[str, tuple[Callable[[Path], object], Row, str]] = {
    "truncated avi": (truncated, {}, "bad.avi: unreadable video (InvalidDataError)"),
    "zero frames": (zero_frame_avi, {}, "bad.avi: video has no frames"),
    "huge declared size": (lambda p: patched_avi(p, size=MAX_SIDE + 1), {}, "bad.avi: too large: 8 frames of 4097x"),
    "65535 x 65535": (lambda p: patched_avi(p, size=65535), {}, "bad.avi: no valid frame size in the header"),
    "a million declared frames": (lambda p: patched_avi(p, frames=1_000_000), {}, "bad.avi: too large: 1000000 frames"),
    "empty file": (lambda p: p.write_bytes(b""), {}, "bad.avi: empty file"),
    "not a video": (lambda p: p.write_bytes(b"RIFF" + bytes(range(256)) * 8), {}, "bad.avi: unreadable video"),
    "directory named like a video": (lambda p: p.mkdir(), {}, "bad.avi: not a regular file"),
    "fifo named like a video": (fifo, {}, "bad.avi: not a regular file"),
    "symlink out of the folder": (outside_link, {}, "bad.avi: link points outside the data folder"),
    "dangling symlink": (lambda p: p.symlink_to(p.parent / "gone.avi"), {}, "bad.avi: file is missing"),
    "missing video": (lambda p: None, {}, "bad.avi: file is missing"),
    "path in FileName": (outside_link, {"FileName": "../../elsewhere"}, "FileName '../../elsewhere' is not a plain"),
    "EF out of range": (truncated, {"EF": 101.5}, "bad.avi: EF 101.5 outside 0-100"),
    "EF not a number": (truncated, {"EF": "sixty"}, "bad.avi: EF 'sixty' is not a number"),
    "EF infinite": (truncated, {"EF": "inf"}, "bad.avi: EF 'inf' is not a finite number"),
    "frame height infinite": (truncated, {"FrameHeight": "inf"}, "bad.avi: FrameHeight 'inf' is not a finite"),
    "duplicate FileName": (lambda p: None, {"FileName": "v0"}, "v0.avi: duplicate FileName row"),
}


@pytest.mark.parametrize("case", list(SITE_FUZZ))
def test_site_loading_skips_each_hostile_file_with_one_line(tmp_path: Path, case: str) -> None:
    make_bad, bad_row, words = SITE_FUZZ[case]
    rows: list[Row] = [{"FileName": f"v{i}", "EF": 50.0} for i in range(GOOD_VIDEOS)]
    rows.append({"FileName": "bad", "EF": 40.0, "write": False} | bad_row)
    root = make_site(tmp_path / "data" / "site_00", rows, frames=32, size=32)
    make_bad(root / "Videos" / "bad.avi")
    site = load_site(root, size=16)
    assert [r.file_name for r in site.records] == [f"v{i}" for i in range(GOOD_VIDEOS)]
    assert [v.shape for v in site.videos] == [(32, 16, 16)] * GOOD_VIDEOS
    [line] = site.problems
    assert words in line and line.startswith(str(root)) and "\n" not in line


def test_oversize_header_is_refused_before_decoding(tmp_path: Path) -> None:
    """The refusal comes from the header, not from a decoder that already allocated the frames."""
    with pytest.raises(EchoFlowError, match=r"too large: 8 frames of 5000x5000 \(limits"):
        read_avi(patched_avi(tmp_path / "a.avi", size=5000))  # FFmpeg itself would accept 5000x5000


def test_a_site_whose_filelist_links_outside_is_refused(tmp_path: Path) -> None:
    root = make_site(tmp_path / "data" / "s", [{"FileName": "v0", "EF": 50.0}], frames=4, size=16)
    (root / "FileList.csv").rename(tmp_path / "FileList.csv")
    (root / "FileList.csv").symlink_to(tmp_path / "FileList.csv")
    with pytest.raises(EchoFlowError, match=r"FileList.csv: link points outside the data folder$"):
        load_site(root, size=16)


def test_a_site_folder_reached_through_a_link_still_loads(tmp_path: Path) -> None:
    """Links inside the folder and a link to the folder itself are fine: only leaving the folder is refused."""
    root = make_site(tmp_path / "real", [{"FileName": "v0", "EF": 50.0}, {"FileName": "v1", "EF": 50.0,
                                                                          "write": False}], frames=4, size=16)
    (root / "Videos" / "v1.avi").symlink_to(root / "Videos" / "v0.avi")
    (tmp_path / "alias").symlink_to(root)
    site = load_site(tmp_path / "alias", size=16)
    assert len(site.videos) == 2 and site.problems == []


def dicom_edit(path: Path, **tags: object) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def with_syntax(path: Path, uid: str) -> Path:
    ds = pydicom.dcmread(write_us(path, scan()))
    ds.file_meta.TransferSyntaxUID = UID(uid)
    ds.save_as(path)
    return path


def cut(path: Path) -> None:
    data = write_us(path, scan()).read_bytes()
    path.write_bytes(data[: len(data) // 2])


def bad_number_of_frames(path: Path) -> None:
    """NumberOfFrames "ab": pydicom cannot even write that, so the bytes are patched."""
    data = write_us(path, scan()).read_bytes()
    path.write_bytes(data.replace(b"\x28\x00\x08\x00IS\x02\x0012", b"\x28\x00\x08\x00IS\x02\x00ab"))


def dicom_outside_link(path: Path) -> None:
    target = write_us(path.parents[1] / "elsewhere.dcm", scan(seed=5), instance="1.2.826.0.1.3680043.8.498.99")
    path.symlink_to(target)


SR = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: a report, not an image
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

# case -> (write the hostile file at the given path, words of its one skip line)
DICOM_FUZZ: dict[str, tuple[Callable[[Path], object], str]] = {
    "truncated": (cut, "truncated file"),
    "huge declared size": (lambda p: dicom_edit(write_us(p, scan()), Rows=65535, Columns=65535),
                           "too large: declared size over the limits (10000 frames, 4096 pixels a side"),
    "a million declared frames": (lambda p: dicom_edit(write_us(p, scan()), NumberOfFrames=1_000_000),
                                  "too large: declared size over the limits"),
    "zero frames": (lambda p: dicom_edit(write_us(p, scan()), NumberOfFrames=0), "no frames (NumberOfFrames)"),
    "broken JPEG stream": (lambda p: write_us(p, scan(), corrupt=True), "cannot decode pixel data (JPEG Baseline"),
    "unknown transfer syntax": (lambda p: with_syntax(p, "1.2.826.0.1.3680043.8.498.7"),
                                "transfer syntax unknown not supported"),
    "no pixel data": (lambda p: write_us(p, scan(), pixel_data=False), "no pixel data"),
    "CT": (lambda p: write_us(p, scan(), modality="CT"), "modality CT, not US"),
    "structured report": (lambda p: dicom_edit(write_us(p, scan(), pixel_data=False), SOPClassUID=SR),
                          "SOP class Basic Text SR Storage is not ultrasound image storage"),
    "secondary capture": (lambda p: dicom_edit(write_us(p, scan()), SOPClassUID=SECONDARY_CAPTURE),
                          "SOP class Secondary Capture Image Storage is not"),
    "malformed header": (bad_number_of_frames, "malformed header (ValueError)"),
    "no frame timing": (lambda p: dicom_edit(write_us(p, scan()), FrameTime=None), "no frame timing"),
    "burned-in text on a still frame": (lambda p: write_us(p, scan(1), BurnedInAnnotation="YES"),
                                        "single frame: burned-in text cannot be told from the image"),
    "not DICOM": (lambda p: p.write_text("CANARY^PHI called on 20240229\n"), "not DICOM"),
    "empty file": (lambda p: p.write_bytes(b""), "empty file"),
    "fifo": (fifo, "not a regular file"),
    "symlink out of the folder": (dicom_outside_link, "link points outside the data folder"),
    "dangling symlink": (lambda p: p.symlink_to(p.parent / "gone.dcm"), "file is missing"),
    "duplicate instance": (lambda p: p.write_bytes((p.parent / "good_a.dcm").read_bytes()),
                           "duplicate SOPInstanceUID"),
}


@pytest.mark.parametrize("case", list(DICOM_FUZZ))
def test_dicom_ingest_skips_each_hostile_file_with_one_line(tmp_path: Path, case: str) -> None:
    make_bad, words = DICOM_FUZZ[case]
    src = tmp_path / "in"
    src.mkdir()
    write_us(src / "good_a.dcm", scan(), instance="1.2.826.0.1.3680043.8.498.1")
    write_us(src / "good_b.dcm", scan(seed=2), instance="1.2.826.0.1.3680043.8.498.2")
    (src / "study.dcm").mkdir()  # a folder named like a file is searched, not read
    write_us(src / "study.dcm" / "good_c.dcm", scan(seed=3), instance="1.2.826.0.1.3680043.8.498.3")
    make_bad(src / "hostile.dcm")
    result = CliRunner().invoke(app, ["data", "ingest", str(src), "--out", str(tmp_path / "site"), "--size", "16",
                                      "--salt", "pepper-site-secret-16"])
    assert result.exit_code == 0, result.output
    [line, summary] = result.output.splitlines()
    assert line.startswith("input #") and words in line and "hostile" not in line
    assert summary.startswith("ingested 3 clips (0 with EF); skipped 1")
    ingested = pd.read_csv(tmp_path / "site" / "FileList.csv")
    assert len(ingested) == 3 and sorted(ingested.NumberOfFrames) == [12, 12, 12]
    assert math.isnan(ingested.EF[0])


def test_single_dicom_reader_names_the_file(tmp_path: Path) -> None:
    path = write_us(tmp_path / "a.dcm", scan(), modality="MR")
    with pytest.raises(EchoFlowError, match=rf"^{tmp_path / 'a.dcm'}: modality MR, not US$"):
        read_ultrasound(path)
