"""Ultrasound DICOM -> grayscale clips in the EchoNet layout, de-identified.

Reads Ultrasound (Multi-frame) Image Storage files: MONOCHROME1/2, RGB, YBR_FULL(_422), uncompressed or
compressed (JPEG baseline decodes through pylibjpeg or Pillow). Other SOP classes are refused, Secondary Capture
included: such screen grabs carry the scanner's whole screen, patient banner and all.

De-identification follows the DICOM PS3.15 Basic Application Level Confidentiality Profile (Annex E) with its
Clean Pixel Data Option, by allow-list: outputs (``Videos/*.avi``, ``FileList.csv``, ``ingest_log.txt``) are
built from scratch, so no header element reaches them unless listed here. The elements we read and their fate:

* PatientID (0010,0020), profile action Z: replaced by the dummy ``sha256(salt + PatientID)[:16]``, so one
  patient's studies stay linked (keep the salt secret and reuse it across ingests).
* SOPInstanceUID (0008,0018), action U: replaced by a salted hash, consistently (it names the video).
* Pixel Data (7FE0,0010), Clean Pixel Data Option: cropped to the ultrasound region and, in a cine, every pixel
  that never changes is blanked (see `clean_pixels`); Burned In Annotation (0028,0301) ``YES`` with nothing to
  clean by (no ultrasound region and no motion) refuses the file.
* Kept, as the profile keeps them (no identifying content): Modality (0008,0060), SOPClassUID (0008,0016),
  TransferSyntaxUID (0002,0010), Rows/Columns (0028,0010/0011), NumberOfFrames (0028,0008), SamplesPerPixel
  (0028,0002), PhotometricInterpretation (0028,0004), BitsStored (0028,0101), FrameTime (0018,1063), CineRate
  (0018,0040), RecommendedDisplayFrameRate (0008,2144), SequenceOfUltrasoundRegions (0018,6011) geometry. Only
  the frame rate and frame count reach the outputs; modality and SOP class name may appear in a skip line.
* Everything else (PatientName, PatientBirthDate, InstitutionName, physicians, AccessionNumber, dates, times,
  Study/Series UIDs, device serials, ...; profile actions X/Z/D/U) is never read, hence never written.

Skipped inputs are named by their position in the sorted file list (``input #3``), never by path, because
hospital paths and file names often carry names or UIDs. Inputs must be regular, non-empty files inside the
DICOM folder (a link out of it is refused), and a header declaring more pixels than ``echonet.MAX_*`` allow is
refused before any pixel is decoded.

EF comes from an optional CSV with an ``EF`` column keyed by ``SOPInstanceUID`` or ``FileName`` (path
relative to the DICOM folder, base name, or stem). Clips without EF get a blank EF cell; read such folders
with ``read_cohort(..., require_ef=False)`` for EF-free uses (VAE, image flow, re-id).
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from echoflow.data.echonet import (
    VideoRecord,
    file_problem,
    read_cohort,
    resize_frames,
    size_problem,
    write_avi,
    write_filelist,
)
from echoflow.errors import EchoFlowError

HASH_CHARS = 16
US_IMAGE_STORAGE = frozenset({
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
    "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (retired, still written by old scanners)
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (retired)
})
STILL_RANGE = 4  # grey levels: a pixel varying less over a cine is an overlay (text, calipers), not echo signal
MIN_MOVING = 0.2  # blank still pixels only when at least this share of the crop moves (else it is a still cine)


class UnusableDicom(EchoFlowError):
    """A file that cannot become a clip; ``reason`` is worded without any identifying header value."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class UltrasoundClip:
    """One decoded ultrasound file (holds identifiers: keep in memory only).

    Attributes:
        frames: (T, H, W) uint8 grayscale, cleaned by `clean_pixels`, not resized.
        fps: frames per second (1.0 for a single frame without timing).
        patient_id: the raw PatientID ("" if absent). instance_uid: the raw SOPInstanceUID.
    """

    frames: np.ndarray
    fps: float
    patient_id: str
    instance_uid: str


def pseudonym(salt: str, value: str) -> str:
    """``sha256(salt + value)`` as 16 hex characters: stable per value, unlinkable without the salt."""
    return hashlib.sha256((salt + value).encode()).hexdigest()[:HASH_CHARS]


def read_ultrasound(path: Path, *, root: Path | None = None) -> UltrasoundClip:
    """Decode an ultrasound DICOM to a cleaned grayscale clip.

    Args:
        path: the DICOM file.
        root: when given, ``path`` must lie inside it once links are resolved.

    Raises:
        UnusableDicom: not a regular non-empty file (inside ``root``), not DICOM, not US image storage, no or
            undecodable pixel data, too large, malformed header, unknown frame rate, uncleanable burned-in text.
    """
    problem = file_problem(path, root)
    if problem is not None:
        raise UnusableDicom(path, problem)
    with _pydicom_silenced():
        try:
            ds = pydicom.dcmread(path)
        except Exception as err:  # a parser fed hostile bytes raises anything from EOFError to struct.error
            raise UnusableDicom(path, "not DICOM") from err
        try:
            return _clip(ds, path)
        except UnusableDicom:
            raise
        except Exception as err:  # pydicom parses elements lazily: a hostile value fails on first access
            raise UnusableDicom(path, f"malformed header ({type(err).__name__})") from err


@contextmanager
def _pydicom_silenced() -> Iterator[None]:
    """Mute pydicom's warnings and log records: they quote header values (``Invalid value for VR DA: '...'``)."""
    logger = logging.getLogger("pydicom")
    was_disabled, logger.disabled = logger.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = was_disabled


def _clip(ds: Dataset, path: Path) -> UltrasoundClip:
    _check_image(ds, path)
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as err:  # decoders raise anything from ValueError to NotImplementedError
        syntax = ds.file_meta.get("TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
        name = syntax.name if syntax is not None and syntax.is_transfer_syntax else "unknown transfer syntax"
        raise UnusableDicom(path, f"cannot decode pixel data ({name})") from err
    gray, coloured = _grayscale(ds, pixels, path)
    fps = frame_rate(ds)
    if fps is None:
        if len(gray) > 1:
            raise UnusableDicom(path, "no frame timing (FrameTime, CineRate, RecommendedDisplayFrameRate)")
        fps = 1.0
    return UltrasoundClip(clean_pixels(ds, gray, coloured, path), round(fps, 2), str(ds.get("PatientID", "") or ""),
                          str(ds.get("SOPInstanceUID", "") or ""))


def _check_image(ds: Dataset, path: Path) -> None:
    """Refuse what is not an ultrasound image we may decode: modality, SOP class, pixel data, declared size."""
    modality = str(ds.get("Modality", "") or "")
    if modality != "US":
        raise UnusableDicom(path, f"modality {modality if modality.isalnum() else 'missing'}, not US")
    sop_class = UID(str(ds.get("SOPClassUID", "") or ""))
    if sop_class not in US_IMAGE_STORAGE:
        known = sop_class.is_valid and sop_class.name != str(sop_class)  # a private UID could name its maker
        raise UnusableDicom(path, f"SOP class {sop_class.name if known else 'unknown'} is not ultrasound image "
                                  "storage")
    if "PixelData" not in ds:
        raise UnusableDicom(path, "no pixel data")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 1 or columns < 1:
        raise UnusableDicom(path, "no image size (Rows, Columns)")
    problem = size_problem(int(ds.get("NumberOfFrames", 1) or 1), rows, columns,
                           samples=int(ds.get("SamplesPerPixel", 1) or 1))
    if problem is not None:
        raise UnusableDicom(path, problem)


def _grayscale(ds: Dataset, pixels: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W) uint8 luma and a (T, H, W) mask of coloured pixels (ECG traces, markers, colour Doppler)."""
    samples = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", ""))
    single = int(ds.get("NumberOfFrames", 1) or 1) == 1
    if single:
        pixels = pixels[None]
    if samples == 3:  # pydicom hands YBR_* over as RGB
        rgb = pixels.astype(np.float32)
        luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        coloured = (rgb.max(-1) - rgb.min(-1)) > 0.15 * float(rgb.max() or 1.0)
    elif samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2"):
        luma = pixels.astype(np.float32)
        if photometric == "MONOCHROME1":
            luma = luma.max() - luma
        coloured = np.zeros(luma.shape, dtype=bool)
    else:
        raise UnusableDicom(path, f"photometric interpretation {photometric or 'missing'} not supported")
    if luma.ndim != 3:
        raise UnusableDicom(path, f"unexpected pixel array shape {pixels.shape}")
    bits = int(ds.get("BitsStored", 8))
    scale = 255.0 / (2**bits - 1) if bits > 8 else 1.0
    return np.clip(luma * scale, 0, 255).round().astype(np.uint8), coloured


def frame_rate(ds: Dataset) -> float | None:
    """Frames per second from FrameTime (ms), CineRate or RecommendedDisplayFrameRate; None if absent."""
    for keyword, to_fps in (("FrameTime", lambda v: 1000.0 / v), ("CineRate", float),
                            ("RecommendedDisplayFrameRate", float)):
        try:
            value = float(ds.get(keyword, "") or "nan")
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            return float(to_fps(value))
    return None


def clean_pixels(ds: Dataset, gray: np.ndarray, coloured: np.ndarray, path: Path) -> np.ndarray:
    """Burned-in text removed from (T, H, W) ``gray``: the Clean Pixel Data step of de-identification.

    1. Crop to the ultrasound region (`ultrasound_region`), else to the fan found from the pixels (`fan_box`);
       text, patient banner, ECG trace and toolbar around the image are cut away.
    2. In a cine where at least ``MIN_MOVING`` of the crop moves, blank (set to 0) every pixel whose grey level
       varies by at most ``STILL_RANGE`` over the clip: echo speckle always changes, overlays drawn inside the
       crop (text in the corners of the fan's box, depth marks, calipers) do not.

    Raises:
        UnusableDicom: BurnedInAnnotation is ``YES`` but neither step applies (a single frame or a still cine
            without ultrasound region): the text could not be told from the image.
    """
    region = ultrasound_region(ds, *gray.shape[1:])
    y0, y1, x0, x1 = region if region is not None else fan_box(gray, coloured)
    frames = gray[:, y0:y1, x0:x1].copy()
    still = (frames.max(0) - frames.min(0)) <= STILL_RANGE
    if len(frames) > 1 and still.mean() <= 1.0 - MIN_MOVING:
        frames[:, still] = 0
    elif region is None and str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        raise UnusableDicom(path, "burned-in annotation cannot be removed (no ultrasound region, no motion)")
    return frames


def ultrasound_region(ds: Dataset, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Crop box ``(y0, y1, x0, x1)`` (end-exclusive) of the largest 2D SequenceOfUltrasoundRegions entry.

    None when there is none inside the ``height`` x ``width`` image (files resized after acquisition keep the
    original coordinates).
    """
    regions = [r for r in ds.get("SequenceOfUltrasoundRegions", []) if r.get("RegionSpatialFormat", 0) == 1]
    boxes = [(int(r.RegionLocationMinY0), int(r.RegionLocationMaxY1) + 1, int(r.RegionLocationMinX0),
              int(r.RegionLocationMaxX1) + 1) for r in regions if "RegionLocationMaxY1" in r]
    inside = [b for b in boxes if 0 <= b[0] < b[1] <= height and 0 <= b[2] < b[3] <= width]
    return max(inside, key=lambda b: (b[1] - b[0]) * (b[3] - b[2])) if inside else None


def fan_box(gray: np.ndarray, coloured: np.ndarray) -> tuple[int, int, int, int]:
    """Crop box ``(y0, y1, x0, x1)`` (end-exclusive) of the fan in (T, H, W) ``gray``, found from the pixels.

    Pixels that change over time (any bright pixel for a single frame), colour excluded, reduced to the longest
    run of columns, then rows, holding at least 5 % of the peak activity, so static text and thin ECG bands drop
    out.
    """
    signal = np.where(coloured, 0, gray).astype(np.float32)
    active = signal.std(0) > 2.0 if len(gray) > 1 else signal[0] > 16.0
    if active.mean() < 0.01:  # a nearly still cine: fall back to brightness
        active = signal.mean(0) > 16.0
    x0, x1 = _longest_run(active.mean(0))
    y0, y1 = _longest_run(active[:, x0:x1].mean(1))
    return y0, y1, x0, x1


def _longest_run(profile: np.ndarray, *, level: float = 0.05) -> tuple[int, int]:
    """``(start, end)`` of the longest run where ``profile >= level * max``; the whole axis if flat zero."""
    if profile.max() <= 0:
        return 0, len(profile)
    above = np.concatenate([[False], profile >= level * profile.max(), [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(above))
    starts, ends = edges[0::2], edges[1::2]
    best = int(np.argmax(ends - starts))
    return int(starts[best]), int(ends[best])


@dataclass
class IngestReport:
    """What ``ingest_dicom`` did. ``skipped``: one line per unusable input, e.g. ``"input #3: not DICOM"``."""

    records: list[VideoRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        """One line: clips written, EF known, inputs skipped by reason."""
        known = sum(not math.isnan(r.ef) for r in self.records)
        why = ", ".join(f"{n} {reason}" for reason, n in self.reasons.most_common())
        return f"ingested {len(self.records)} clips ({known} with EF); skipped {len(self.skipped)}" + (
            f" ({why})" if why else "")


def ingest_dicom(dicom_dir: Path, out: Path, *, salt: str, size: int = 112,
                 ef_csv: Path | None = None) -> IngestReport:
    """Convert every file under ``dicom_dir`` to ``out/Videos/<hash>.avi`` + ``out/FileList.csv``.

    Rows already in ``out/FileList.csv`` are kept (so batches can be ingested one after another with the same
    salt). Split is drawn per patient from the patient hash (80/10/10 TRAIN/VAL/TEST). The skipped lines and
    the summary also go to ``out/ingest_log.txt``.

    Args:
        dicom_dir: folder searched recursively (links to folders are not followed); every non-hidden entry
            but a folder is tried, and one that is no regular file inside ``dicom_dir`` gets a skip line.
        out: output site folder (its name is the site name).
        salt: secret prefix of every hash.
        size: output frame height = width, pixels.
        ef_csv: optional EF table (see module docstring).

    Raises:
        EchoFlowError: ``dicom_dir`` is not a folder or the EF table is unusable.
    """
    if not dicom_dir.is_dir():
        raise EchoFlowError(f"{dicom_dir}: not a folder")
    ef_table = _read_ef_table(ef_csv) if ef_csv is not None else {}
    inputs = sorted(p for p in dicom_dir.rglob("*")  # every entry but real folders: links and FIFOs get a line
                    if not (p.is_dir() and not p.is_symlink())
                    and not any(part.startswith(".") for part in p.relative_to(dicom_dir).parts))
    report, names = IngestReport(), set()
    for number, path in enumerate(inputs, start=1):
        try:
            clip = read_ultrasound(path, root=dicom_dir)
        except UnusableDicom as err:
            report.skipped.append(f"input #{number}: {err.reason}")
            report.reasons[err.reason.split(" (")[0].split(":")[0]] += 1  # "too large: 9 frames ..." -> "too large"
            continue
        name = pseudonym(salt, "instance:" + (clip.instance_uid or path.relative_to(dicom_dir).as_posix()))
        if name in names:
            report.skipped.append(f"input #{number}: duplicate SOPInstanceUID")
            report.reasons["duplicate SOPInstanceUID"] += 1
            continue
        names.add(name)
        patient = pseudonym(salt, "patient:" + (clip.patient_id or clip.instance_uid))
        keys = (clip.instance_uid, path.relative_to(dicom_dir).as_posix(), path.name, path.stem)
        ef = next((ef_table[k] for k in keys if k in ef_table), math.nan)
        frames = resize_frames(clip.frames, size=size)
        video = out / "Videos" / f"{name}.avi"
        write_avi(video, frames, clip.fps)
        bucket = int(patient, 16) % 10
        split = "TRAIN" if bucket < 8 else "VAL" if bucket == 8 else "TEST"
        report.records.append(VideoRecord(name, video, ef, math.nan, math.nan, clip.fps, len(frames), size, size,
                                          split, patient, out.resolve().name))
    kept = read_cohort(out, require_ef=False).records if (out / "FileList.csv").is_file() else []
    write_filelist(out, [r for r in kept if r.file_name not in names] + report.records)
    (out / "ingest_log.txt").write_text("\n".join([*report.skipped, report.summary()]) + "\n")
    return report


def _read_ef_table(path: Path) -> dict[str, float]:
    """``key -> EF`` from a CSV with ``EF`` and ``SOPInstanceUID`` and/or ``FileName`` columns."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise EchoFlowError(f"{path}: unreadable EF table ({type(err).__name__})") from err
    keys = [c for c in ("SOPInstanceUID", "FileName") if c in table.columns]
    if "EF" not in table.columns or not keys:
        raise EchoFlowError(f"{path}: EF table needs an EF column and a SOPInstanceUID or FileName column")
    efs: dict[str, float] = {}
    for row_number, row in enumerate(table.to_dict("records"), start=2):
        try:
            ef = float(row["EF"])
        except ValueError:
            raise EchoFlowError(f"{path}: line {row_number}: EF {row['EF']!r} is not a number") from None
        if not 0.0 <= ef <= 100.0:
            raise EchoFlowError(f"{path}: line {row_number}: EF {ef} outside 0-100")
        efs.update({row[k].strip(): ef for k in keys if row[k].strip()})
    return efs
