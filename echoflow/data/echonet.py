"""The EchoNet-Dynamic layout: ``Videos/*.avi`` + ``FileList.csv`` (+ ``VolumeTracings.csv``).

Videos are grayscale AVIs. We write them losslessly (FFV1, 8-bit gray) so a write/read round trip is
byte-identical; we read anything FFmpeg decodes (EchoNet's own MJPEG/XVID files included).

``FileList.csv`` has EchoNet-Dynamic's nine columns (``FileName, EF, ESV, EDV, FrameHeight, FrameWidth, FPS,
NumberOfFrames, Split``) and optionally ``PatientID`` and ``Site`` (our cohorts write both; real EchoNet has
neither, so each video is its own patient and the folder name is the site). A blank ``EF`` means "unknown"
(ingested DICOM without an EF table): it is a problem row unless the reader is told ``require_ef=False``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from echoflow.errors import EchoFlowError

SPLITS = ("TRAIN", "VAL", "TEST")
FILELIST_COLUMNS = (
    "FileName", "EF", "ESV", "EDV", "FrameHeight", "FrameWidth", "FPS", "NumberOfFrames", "Split",
)


@dataclass(frozen=True)
class VideoRecord:
    """One row of ``FileList.csv``.

    Attributes:
        file_name: video stem as written in FileList (EchoNet omits the ``.avi``).
        path: the video file.
        ef: ejection fraction, percent 0-100; ``edv``/``esv``: end-diastolic/-systolic volume, mL.
        fps: frames per second; ``num_frames``, ``height``, ``width``: as declared in FileList.
        split: ``TRAIN`` | ``VAL`` | ``TEST``, by patient (no patient in two splits).
        patient_id: stable patient key (a salted hash for ingested DICOM); ``site``: the hospital site name.
    """

    file_name: str
    path: Path
    ef: float
    esv: float
    edv: float
    fps: float
    num_frames: int
    height: int
    width: int
    split: str
    patient_id: str
    site: str


@dataclass
class Cohort:
    """What ``read_cohort`` found in one folder.

    Attributes:
        records: every good FileList row, in file order.
        problems: one line ``"<file>: <problem>"`` per skipped row.
    """

    records: list[VideoRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def write_avi(path: Path, frames: np.ndarray, fps: float) -> None:
    """Write ``frames`` (T, H, W) uint8, T >= 1, as a lossless grayscale AVI (FFV1) at ``fps``."""
    if frames.ndim != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise EchoFlowError(f"{path}: expected (T>=1, H, W) uint8 frames, got {frames.shape} {frames.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="avi") as container:
        stream = container.add_stream("ffv1", rate=round(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "gray"
        stream.thread_count = 1
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="gray")))
        container.mux(stream.encode(None))


def read_avi(path: Path) -> np.ndarray:
    """Decode a video to (T, H, W) uint8 grayscale; raise ``EchoFlowError`` naming the file if unreadable."""
    if not path.is_file():
        raise EchoFlowError(f"{path}: video file is missing")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise EchoFlowError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_count = 1
            declared = stream.frames
            frames = [frame.to_ndarray(format="gray") for frame in container.decode(stream)]
    except EchoFlowError:
        raise
    except (av.FFmpegError, ValueError, OSError) as err:
        raise EchoFlowError(f"{path}: unreadable video ({type(err).__name__})") from err
    if not frames:
        raise EchoFlowError(f"{path}: video has no frames")
    if len(frames) < declared:  # FFmpeg may stop quietly at a cut that falls between two frames
        raise EchoFlowError(f"{path}: truncated video ({len(frames)} of {declared} frames decoded)")
    return np.stack(frames)


def resize_frames(frames: np.ndarray, *, size: int) -> np.ndarray:
    """Resize (T, H, W) uint8 frames to (T, size, size) uint8: bilinear with antialias, no letterbox."""
    if frames.shape[1:] == (size, size):
        return frames
    images = torch.from_numpy(np.ascontiguousarray(frames)).unsqueeze(1).float()
    resized = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()


def load_video(path: Path, *, size: int) -> np.ndarray:
    """Decode any AVI (e.g. EchoNet's 112x112) to (T, size, size) uint8; ``EchoFlowError`` names bad files."""
    return resize_frames(read_avi(path), size=size)


def read_cohort(root: Path, *, require_ef: bool = True) -> Cohort:
    """Read ``root/FileList.csv`` and check every row against ``root/Videos/``.

    Args:
        root: a folder in the EchoNet-Dynamic layout (real EchoNet, a phantom site, or ingested DICOM).
        require_ef: when False, a blank EF loads as NaN (EF-free uses: VAE, image flow, re-id); an EF
            outside 0-100 is a problem either way.

    Returns:
        The good rows as records; one problem line per bad row (missing video, bad EF, split, numbers).

    Raises:
        EchoFlowError: ``root`` is no dataset, FileList is unreadable or lacks required columns.
    """
    filelist = root / "FileList.csv"
    if not filelist.is_file() or not (root / "Videos").is_dir():
        raise EchoFlowError(f"{root}: not an EchoNet-style dataset (needs FileList.csv and Videos/)")
    try:
        table = pd.read_csv(filelist, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise EchoFlowError(f"{filelist}: unreadable CSV ({type(err).__name__})") from err
    missing = [column for column in FILELIST_COLUMNS if column not in table.columns]
    if missing:
        raise EchoFlowError(f"{filelist}: missing columns {', '.join(missing)}")
    cohort = Cohort()
    seen: set[str] = set()
    for row in table.to_dict("records"):
        try:
            record = _parse_row({str(key): value for key, value in row.items()}, root, require_ef=require_ef)
            if record.file_name in seen:
                raise EchoFlowError(f"{record.path}: duplicate FileName row")
        except EchoFlowError as err:
            cohort.problems.append(str(err))
            continue
        seen.add(record.file_name)
        cohort.records.append(record)
    return cohort


def _parse_row(row: dict[str, str], root: Path, *, require_ef: bool) -> VideoRecord:
    name = row["FileName"].strip()
    stem = name[:-4] if name.lower().endswith(".avi") else name
    path = root / "Videos" / f"{stem}.avi"
    if not stem:
        raise EchoFlowError(f"{root / 'FileList.csv'}: row with blank FileName")

    def number(column: str, *, positive: bool = True) -> float:
        text = row[column].strip()
        try:
            value = float(text) if text else math.nan
        except ValueError:
            raise EchoFlowError(f"{path}: {column} {text!r} is not a number") from None
        if positive and not value > 0:
            raise EchoFlowError(f"{path}: {column} {text!r} must be a positive number")
        return value

    ef = number("EF", positive=False)
    if (math.isnan(ef) and require_ef) or not (math.isnan(ef) or 0.0 <= ef <= 100.0):
        raise EchoFlowError(f"{path}: EF {row['EF'].strip() or 'blank'} outside 0-100")
    split = row["Split"].strip().upper()
    if split not in SPLITS:
        raise EchoFlowError(f"{path}: Split {row['Split']!r} is not one of {'/'.join(SPLITS)}")
    if not path.is_file():
        raise EchoFlowError(f"{path}: video file is missing")
    return VideoRecord(
        file_name=stem, path=path, ef=ef, esv=number("ESV", positive=False),
        edv=number("EDV", positive=False), fps=number("FPS"), num_frames=int(number("NumberOfFrames")),
        height=int(number("FrameHeight")), width=int(number("FrameWidth")), split=split,
        patient_id=row.get("PatientID", "").strip() or stem,
        site=row.get("Site", "").strip() or root.resolve().name,
    )


def write_filelist(root: Path, records: Sequence[VideoRecord]) -> Path:
    """Write ``root/FileList.csv``: EchoNet's columns + PatientID, Site; NaN EF/ESV/EDV become blank cells.

    Records' videos are expected at ``root/Videos/<file_name>.avi`` (where ``read_cohort`` looks).
    Returns the CSV path.
    """
    table = pd.DataFrame(
        [(r.file_name, r.ef, r.esv, r.edv, r.height, r.width, r.fps, r.num_frames, r.split, r.patient_id,
          r.site) for r in records],
        columns=[*FILELIST_COLUMNS, "PatientID", "Site"],
    )
    root.mkdir(parents=True, exist_ok=True)
    table.to_csv(root / "FileList.csv", index=False, na_rep="")
    return root / "FileList.csv"
