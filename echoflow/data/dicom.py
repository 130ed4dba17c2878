"""One ultrasound DICOM file -> a grayscale clip, pixels de-identified (a folder: `echoflow.data.ingest`).

Reads Ultrasound (Multi-frame) Image Storage files: MONOCHROME1/2, RGB, YBR_FULL(_422), uncompressed or
compressed (JPEG baseline decodes through pylibjpeg or Pillow). Other SOP classes are refused, Secondary Capture
included: such screen grabs carry the scanner's whole screen, patient banner and all.

De-identification follows the DICOM PS3.15 Basic Application Level Confidentiality Profile (Annex E) with its
Clean Pixel Data Option, by allow-list: header elements are read only here (and the two pixel-cleaning ones in
`echoflow.data.dicom_pixels`), and the outputs of `echoflow.data.ingest` (``Videos/*.avi``, ``FileList.csv``,
``ingest_log.txt``) are built from scratch, so no header element reaches them unless listed here. The elements
we read and their fate:

* PatientID (0010,0020), profile action Z: replaced by the dummy ``sha256(salt + PatientID)[:16]``, so one
  patient's studies stay linked (keep the salt secret and reuse it across ingests).
* SOPInstanceUID (0008,0018), action U: replaced by a salted hash, consistently (it names the video).
* Pixel Data (7FE0,0010), Clean Pixel Data Option: cropped to the ultrasound region and, in a cine, every pixel
  that never changes is blanked (see `echoflow.data.dicom_pixels`); Burned In Annotation (0028,0301) ``YES``
  with nothing to clean by (no ultrasound region and no motion) refuses the file.
* Kept, as the profile keeps them (no identifying content): Modality (0008,0060), SOPClassUID (0008,0016),
  TransferSyntaxUID (0002,0010), Rows/Columns (0028,0010/0011), NumberOfFrames (0028,0008), SamplesPerPixel
  (0028,0002), PhotometricInterpretation (0028,0004), BitsStored (0028,0101), FrameTime (0018,1063), CineRate
  (0018,0040), RecommendedDisplayFrameRate (0008,2144), SequenceOfUltrasoundRegions (0018,6011) geometry. Only
  the frame rate and frame count reach the outputs; modality and SOP class name may appear in a skip line.
* Everything else (PatientName, PatientBirthDate, InstitutionName, physicians, AccessionNumber, dates, times,
  Study/Series UIDs, device serials, ...; profile actions X/Z/D/U) is never read, hence never written.

Inputs must be regular, non-empty files inside the DICOM folder (a link out of it is refused), and a header
declaring more pixels than ``echonet.MAX_*`` allow is refused before any pixel is decoded. A refused file raises
`UnusableDicom`, whose reason names no identifying header value.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from echoflow.data.dicom_pixels import UnusableDicom, clean_pixels
from echoflow.data.echonet import file_problem, size_problem

HASH_CHARS = 16
US_IMAGE_STORAGE = frozenset({
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
    "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (retired, still written by old scanners)
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (retired)
})


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
