"""The EchoNet-Dynamic layout: ``Videos/*.avi`` + ``FileList.csv`` (+ ``VolumeTracings.csv``).

Videos are grayscale AVIs. We write them losslessly (FFV1, 8-bit gray) so a write/read round trip is
byte-identical; we read anything FFmpeg decodes (EchoNet's own MJPEG/XVID files included).

``FileList.csv`` has EchoNet-Dynamic's nine columns (``FileName, EF, ESV, EDV, FrameHeight, FrameWidth, FPS,
NumberOfFrames, Split``) and optionally ``PatientID`` and ``Site`` (our cohorts write both; real EchoNet has
neither, so each video is its own patient and the folder name is the site). A blank ``EF`` means "unknown"
(ingested DICOM without an EF table): it is a problem row unless the reader is told ``require_ef=False``.

Hostile folders: a data folder never reads outside itself (a FileName with a path in it, or a link leading out of
the folder, is a problem row), only regular non-empty files are opened (a FIFO named like a video would block),
and a video is measured from its header before decoding: one declaring more than ``MAX_FRAMES`` frames,
``MAX_SIDE`` pixels a side or ``MAX_VOXELS`` pixels in all is refused before any frame is allocated.
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
MAX_SIDE = 4096  # pixels a side: a 4K ultrasound screen; a larger header lies or is hostile
MAX_FRAMES = 10_000  # 6.7 min at 25 fps, far beyond any echo loop
MAX_VOXELS = 2**30  # frames x height x width (x samples) of one video: 1 GiB as 8-bit gray
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


def size_problem(frames: int, height: int, width: int, *, samples: int = 1) -> str | None:
    """Why a video of this (declared or decoded) size must not be decoded; None when it may."""
    if frames > MAX_FRAMES or height > MAX_SIDE or width > MAX_SIDE or frames * height * width * samples > MAX_VOXELS:
        channels = f"x{samples}" if samples > 1 else ""
        return (f"too large: {frames} frames of {height}x{width}{channels} (limits: {MAX_FRAMES} frames, "
                f"{MAX_SIDE} pixels a side, 2^{MAX_VOXELS.bit_length() - 1} values)")
    return None


def file_problem(path: Path, root: Path | None = None) -> str | None:
    """Why ``path`` must not be opened: outside ``root`` (links resolved), missing, not a regular file, empty."""
    if root is not None and not path.resolve().is_relative_to(root.resolve()):
        return "link points outside the data folder"
    if not path.exists():
        return "file is missing"
    if not path.is_file():
        return "not a regular file"
    if path.stat().st_size == 0:
        return "empty file"
    return None


def read_avi(path: Path) -> np.ndarray:
    """Decode a video to (T, H, W) uint8 grayscale; raise ``EchoFlowError`` naming the file if unreadable.

    The header's frame count and size are checked against the limits before decoding (`size_problem`), and
    again as frames arrive, since a header may also understate them.
    """
    problem = file_problem(path)
    if problem is not None:
        raise EchoFlowError(f"{path}: {problem}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise EchoFlowError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_count = 1
            declared, height, width = stream.frames, stream.codec_context.height, stream.codec_context.width
            if height < 1 or width < 1:  # FFmpeg zeroes a size it refuses (e.g. 65535 x 65535)
                raise EchoFlowError(f"{path}: no valid frame size in the header")
            _refuse_oversize(path, declared, height, width)
            stream.codec_context.options = {"max_pixels": str(MAX_SIDE * MAX_SIDE)}  # per-frame headers lie too
            frames: list[np.ndarray] = []
            for frame in container.decode(stream):
                _refuse_oversize(path, len(frames) + 1, frame.height, frame.width)
                frames.append(frame.to_ndarray(format="gray"))
    except EchoFlowError:
        raise
    except (av.FFmpegError, ValueError, OSError) as err:
        raise EchoFlowError(f"{path}: unreadable video ({type(err).__name__})") from err
    if not frames:
        raise EchoFlowError(f"{path}: video has no frames")
    if len(frames) < declared:  # FFmpeg may stop quietly at a cut that falls between two frames
        raise EchoFlowError(f"{path}: truncated video ({len(frames)} of {declared} frames decoded)")
    return np.stack(frames)


def _refuse_oversize(path: Path, frames: int, height: int, width: int) -> None:
    problem = size_problem(frames, height, width)
    if problem is not None:
        raise EchoFlowError(f"{path}: {problem}")


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
    problem = file_problem(filelist, root)
    if problem is not None:
        raise EchoFlowError(f"{filelist}: {problem}")
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
    if not stem:
        raise EchoFlowError(f"{root / 'FileList.csv'}: row with blank FileName")
    if any(c in stem for c in "/\\\0") or stem in (".", ".."):
        raise EchoFlowError(f"{root / 'FileList.csv'}: FileName {name!r} is not a plain file name")
    path = root / "Videos" / f"{stem}.avi"

    def number(column: str, *, positive: bool = True) -> float:
        text = row[column].strip()
        try:
            value = float(text) if text else math.nan
        except ValueError:
            raise EchoFlowError(f"{path}: {column} {text!r} is not a number") from None
        if text and not math.isfinite(value):
            raise EchoFlowError(f"{path}: {column} {text!r} is not a finite number")
        if positive and not value > 0:
            raise EchoFlowError(f"{path}: {column} {text!r} must be a positive number")
        return value

    ef = number("EF", positive=False)
    if (math.isnan(ef) and require_ef) or not (math.isnan(ef) or 0.0 <= ef <= 100.0):
        raise EchoFlowError(f"{path}: EF {row['EF'].strip() or 'blank'} outside 0-100")
    split = row["Split"].strip().upper()
    if split not in SPLITS:
        raise EchoFlowError(f"{path}: Split {row['Split']!r} is not one of {'/'.join(SPLITS)}")
    problem = file_problem(path, root)
    if problem is not None:
        raise EchoFlowError(f"{path}: {problem}")
    return VideoRecord(
        file_name=stem, path=path, ef=ef, esv=number("ESV", positive=False),
        edv=number("EDV", positive=False), fps=number("FPS"), num_frames=int(number("NumberOfFrames")),
        height=int(number("FrameHeight")), width=int(number("FrameWidth")), split=split,
        patient_id=row.get("PatientID", "").strip() or stem,
        site=row.get("Site", "").strip() or root.resolve().name,
    )


def end_diastolic_frames(root: Path) -> dict[str, int]:
    """Each traced video's end-diastolic frame, from ``root/VolumeTracings.csv``: FileName stem -> frame index.

    EchoNet traces two frames per video, ED and ES, as chords across the LV; the ED frame is the one whose chords
    are longer in total (the larger cavity). A missing or unreadable file gives no frames.
    """
    path = root / "VolumeTracings.csv"
    try:
        table = pd.read_csv(path)
        table["chord"] = np.hypot(table["X2"] - table["X1"], table["Y2"] - table["Y1"])
        size = table.groupby(["FileName", "Frame"])["chord"].sum()
    except (OSError, KeyError, ValueError, pd.errors.ParserError):
        return {}
    largest = size.groupby(level=0).idxmax()
    return {Path(str(name)).stem: int(frame) for name, frame in largest.to_numpy()}


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
