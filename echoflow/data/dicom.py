"""One ultrasound DICOM file -> a grayscale clip, pixels de-identified (a folder: `echoflow.data.ingest`).

Reads Ultrasound (Multi-frame) Image Storage files: MONOCHROME1/2, RGB, YBR_FULL(_422), uncompressed or
compressed (JPEG baseline decodes through pylibjpeg or Pillow). Other SOP classes are refused, Secondary Capture
included: such screen grabs carry the scanner's whole screen, patient banner and all.

De-identification follows the DICOM PS3.15 Basic Application Level Confidentiality Profile (Annex E) with its
Clean Pixel Data Option, by allow-list: header elements are read only here (and the two pixel-cleaning ones in
`echoflow.data.dicom_pixels`), and the outputs of `echoflow.data.ingest` (``Videos/*.avi``, ``FileList.csv``,
``ingest_log.txt``) are built from scratch, so no header element reaches them unless listed here. The elements
we read and their fate:

* PatientID (0010,0020), profile action Z: replaced by the dummy `pseudonym`, HMAC-SHA256 keyed with the site's
  secret salt (at least 128 bits), so one patient's studies stay linked (keep the salt secret and reuse it).
* SOPInstanceUID (0008,0018), action U: replaced by the same keyed hash, consistently (it names the video).
* Pixel Data (7FE0,0010), Clean Pixel Data Option: cropped and masked to the fitted sector, overlays inside it
  found and filled, single frames and low-motion cines refused unless the site accepts the risk (see
  `echoflow.data.dicom_pixels`), whatever Burned In Annotation (0028,0301) says.
* Kept, as the profile keeps them (no identifying content): Modality (0008,0060), SOPClassUID (0008,0016),
  TransferSyntaxUID (0002,0010), Rows/Columns (0028,0010/0011), NumberOfFrames (0028,0008), SamplesPerPixel
  (0028,0002), PhotometricInterpretation (0028,0004), BitsStored (0028,0101), FrameTime (0018,1063), CineRate
  (0018,0040), RecommendedDisplayFrameRate (0008,2144), SequenceOfUltrasoundRegions (0018,6011) geometry,
  BitsAllocated (0028,0100), PlanarConfiguration (0028,0006). Only the frame rate and frame count reach the
  outputs; a skip line may name a modality, SOP class, transfer syntax or photometric interpretation, and only
  when it is one of the DICOM standard's own codes or UIDs (never free text from the file).
* Everything else (PatientName, PatientBirthDate, InstitutionName, physicians, AccessionNumber, dates, times,
  Study/Series UIDs, device serials, ...; profile actions X/Z/D/U) is never read, hence never written.

Resources are bounded before anything is decoded: inputs must be regular, non-empty files of at most
``MAX_FILE_BYTES`` inside the DICOM folder (a link out of it, or a link loop, is refused); Deflated files are
inflated to at most ``MAX_FILE_BYTES`` (into a temporary file) or refused; the header's size must stay within
``echonet.MAX_FRAMES`` / ``MAX_SIDE`` and ``MAX_PIXELS`` frames x rows x columns; native PixelData must be exactly
as long as the header says (extra data is refused, not turned into frames); an encapsulated PixelData must hold
exactly NumberOfFrames frames, and each compressed frame's own header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ)
must declare Rows x Columns x SamplesPerPixel before that frame is decoded; frames are then decoded one at a
time. Frame rates outside ``FPS_RANGE`` are refused. A refused file raises `UnusableDicom`, whose reason names
no path and no value from the file.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import math
import stat
import struct
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.filebase import DicomFileLike
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.pixels import iter_pixels
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from echoflow.data.dicom_pixels import UnusableDicom, clean_pixels
from echoflow.data.echonet import MAX_FRAMES, MAX_SIDE
from echoflow.errors import EchoFlowError

HASH_CHARS = 32  # hex characters of a pseudonym: 128 bits of HMAC-SHA256
MIN_KEY_BYTES = 16  # 128 bits
MAX_PIXELS = 3 * 2**26  # frames x rows x columns of one file: its 8-bit grayscale clip (192 MiB) is in memory
MAX_FILE_BYTES = 2**28 + 2**26  # a file (or an inflated Deflated dataset) larger than this (320 MiB) is refused
ROW_BLOCK = 256  # rows of a frame converted to grayscale at a time
FPS_RANGE = (1.0, 1000.0)
DEFER_BYTES = 2**16  # header values longer than this (PixelData) stay on disk until read
US_IMAGE_STORAGE = frozenset({
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
    "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (retired, still written by old scanners)
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (retired)
})
# PS3.3 C.7.3.1.1.1 Modality defined terms, retired ones included: only these may be named in a skip line.
MODALITIES = frozenset(
    "AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER "
    "KO LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA PLAN POS PR PT PX REG RESP RF RG RTDOSE "
    "RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA "
    "XAPROTOCOL XC CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF".split())
MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
PHOTOMETRIC = MONOCHROME | COLOUR | {"PALETTE COLOR", "YBR_PARTIAL_420", "YBR_PARTIAL_422", "HSV", "ARGB", "CMYK",
                                     "XYB"}
JPEG = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                  "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
JPEG_2000 = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})
RLE = "1.2.840.10008.1.2.5"
NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", DeflatedExplicitVRLittleEndian})
_SOF = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}) | {0xF7}  # JPEG start-of-frame markers + JPEG-LS SOF55


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


def pseudonym_key(salt: str | bytes) -> bytes:
    """The HMAC key of a site's secret salt; refused (one line, the salt not quoted) under 128 bits."""
    key = salt.encode("utf-8", "surrogateescape") if isinstance(salt, str) else bytes(salt)
    if len(key) < MIN_KEY_BYTES:
        raise EchoFlowError(f"--salt must be at least {MIN_KEY_BYTES} bytes ({8 * MIN_KEY_BYTES} bits) of secret")
    return key


def pseudonym(salt: str | bytes, value: str | bytes) -> str:
    """HMAC-SHA256 of ``value`` keyed with ``salt`` (>= 16 bytes), as 32 hex characters.

    Stable per value; without the salt neither linkable to the ID nor invertible by trying every ID.
    """
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return hmac.new(pseudonym_key(salt), data, hashlib.sha256).hexdigest()[:HASH_CHARS]


def input_problem(path: Path, root: Path | None = None) -> str | None:
    """Why ``path`` must not be opened; None when it may.

    Links are resolved (loops caught): outside ``root``, missing, not a regular file, empty, larger than
    ``MAX_FILE_BYTES``. The reason names no path.
    """
    try:
        target = path.resolve(strict=True)
        info = target.stat()
    except RuntimeError:  # Python 3.11 reports a symlink loop so
        return "link loop"
    except FileNotFoundError:
        return "file is missing"
    except OSError as err:
        return "link loop" if err.errno == errno.ELOOP else f"cannot open ({type(err).__name__})"
    if root is not None and not target.is_relative_to(root.resolve()):
        return "link points outside the data folder"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size == 0:
        return "empty file"
    if info.st_size > MAX_FILE_BYTES:
        return f"file larger than {MAX_FILE_BYTES >> 20} MiB"
    return None


def read_ultrasound(path: Path, *, root: Path | None = None, accept_burned_in_risk: bool = False
                    ) -> UltrasoundClip:
    """Decode an ultrasound DICOM to a cleaned grayscale clip, in bounded memory and time.

    Args:
        path: the DICOM file.
        root: when given, ``path`` must lie inside it once links are resolved.
        accept_burned_in_risk: ingest single frames and low-motion cines, whose burned-in text cannot be told
            from the image, with the still-image text detector only (`echoflow.data.dicom_pixels`).

    Raises:
        UnusableDicom: not a regular non-empty file (inside ``root``), not DICOM, truncated, not US image
            storage, no or undecodable pixel data, too large or inconsistent sizes, frame rate unknown or outside
            ``FPS_RANGE``, burned-in text that cannot be told from the image.
    """
    problem = input_problem(path, root)
    if problem is not None:
        raise UnusableDicom(path, problem)
    with _pydicom_silenced(), ExitStack() as stack:
        source = _plain_source(path, stack)
        ds = _read(source, path)
        try:
            return _clip(ds, source, path, accept_burned_in_risk)
        except UnusableDicom:
            raise
        except MemoryError as err:
            raise UnusableDicom(path, "out of memory while decoding") from err
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


def _plain_source(path: Path, stack: ExitStack) -> Path:
    """``path``, or for a Deflated file a temporary Explicit VR Little Endian copy of it.

    Inflated to at most ``MAX_FILE_BYTES``; pydicom itself would inflate all of it into memory.
    """
    try:
        with path.open("rb") as fp:
            read_preamble(fp, False)
            meta = _read_file_meta_info(fp)
            if meta.get("TransferSyntaxUID", None) != DeflatedExplicitVRLittleEndian:
                return path
            plain = stack.enter_context(tempfile.NamedTemporaryFile(prefix="echoflow-", suffix=".dcm"))
            header = DicomFileLike(plain)
            header.is_little_endian, header.is_implicit_VR = True, False
            header.write(bytes(128) + b"DICM")
            meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what is left once inflated
            write_file_meta_info(header, meta, enforce_standard=True)
            inflater, written = zlib.decompressobj(-zlib.MAX_WBITS), 0
            while chunk := fp.read(2**20):
                while chunk:
                    data = inflater.decompress(chunk, 2**24)
                    written += len(data)
                    if written > MAX_FILE_BYTES:
                        raise UnusableDicom(path, f"Deflated data inflates past {MAX_FILE_BYTES >> 20} MiB")
                    plain.write(data)
                    chunk = inflater.unconsumed_tail
            plain.write(inflater.flush())
            plain.flush()
            return Path(plain.name)
    except UnusableDicom:
        raise
    except Exception as err:  # a parser fed hostile bytes raises anything from EOFError to struct.error
        raise UnusableDicom(path, "not DICOM") from err


def _read(source: Path, path: Path) -> Dataset:
    """Parse the header of ``source`` (``path`` or its inflated copy), PixelData left on disk.

    A value cut short by the file's end is refused as truncated.
    """
    try:
        ds = pydicom.dcmread(source, defer_size=DEFER_BYTES)
    except Exception as err:  # a parser fed hostile bytes raises anything from EOFError to struct.error
        raise UnusableDicom(path, "not DICOM") from err
    size = source.stat().st_size
    for element in _raw_elements(ds):
        if isinstance(element, RawDataElement) and element.length != 0xFFFFFFFF and (
                element.value_tell + element.length > size):
            raise UnusableDicom(path, "truncated file")
    return ds


def _raw_elements(ds: Dataset) -> list[RawDataElement | DataElement]:
    """The top-level elements as parsed, deferred values unread (``Dataset.elements`` may read some)."""
    return list(ds._dict.values())


def _frame_count(ds: Dataset) -> int:
    """NumberOfFrames, 1 when absent or blank (a single-frame SOP class); 0 stays 0."""
    value = ds.get("NumberOfFrames", None)
    return 1 if value is None or str(value).strip() == "" else int(value)


def _clip(ds: Dataset, source: Path, path: Path, accept_burned_in_risk: bool) -> UltrasoundClip:
    _check_image(ds, path)
    frames = _frame_count(ds)
    fps = frame_rate(ds)
    if fps is None:
        if frames > 1:
            raise UnusableDicom(path, "no frame timing (FrameTime, CineRate, RecommendedDisplayFrameRate)")
        fps = 1.0
    if not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:
        raise UnusableDicom(path, f"frame rate outside {FPS_RANGE[0]:g}-{FPS_RANGE[1]:g} fps")
    _check_pixel_data(ds, path, frames)
    if "PixelData" in ds:
        del ds.PixelData  # encapsulated frames were read to check their headers: they go before decoding
    gray, coloured = _decode(ds, source, path, frames)
    patient, instance = str(ds.get("PatientID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    cleaned = clean_pixels(ds, gray, coloured, path, accept_burned_in_risk=accept_burned_in_risk)
    return UltrasoundClip(cleaned, round(fps, 2), patient, instance)


def _check_image(ds: Dataset, path: Path) -> None:
    """Refuse what is not an ultrasound image we may decode: modality, SOP class, pixel data, declared size."""
    modality = str(ds.get("Modality", "") or "").strip()
    if modality != "US":
        named = modality if modality in MODALITIES else "not US (no DICOM modality code)" if modality else "missing"
        raise UnusableDicom(path, f"modality {named}" + (", not US" if modality in MODALITIES else ""))
    sop_class = UID(str(ds.get("SOPClassUID", "") or ""))
    if sop_class not in US_IMAGE_STORAGE:
        known = sop_class.is_valid and sop_class.name != str(sop_class)  # a private UID could name its maker
        raise UnusableDicom(path, f"SOP class {sop_class.name if known else 'unknown'} is not ultrasound image "
                                  "storage")
    if "PixelData" not in ds:
        raise UnusableDicom(path, "no pixel data")
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "") if hasattr(ds, "file_meta") else ""
    if syntax not in NATIVE | JPEG | JPEG_2000 | {RLE}:
        uid = UID(syntax)
        named = uid.name if uid.is_transfer_syntax else "unknown"
        raise UnusableDicom(path, f"transfer syntax {named} not supported")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 1 or columns < 1:
        raise UnusableDicom(path, "no image size (Rows, Columns)")
    frames, samples = _frame_count(ds), int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    if frames < 1:
        raise UnusableDicom(path, "no frames (NumberOfFrames)")
    if bits not in (8, 16):
        raise UnusableDicom(path, "bits allocated not 8 or 16")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if (photometric, samples) not in {*((p, 1) for p in MONOCHROME), *((p, 3) for p in COLOUR)}:
        named = f" {photometric}" if photometric in PHOTOMETRIC else ""
        raise UnusableDicom(path, f"photometric interpretation{named} not supported")
    if (frames > MAX_FRAMES or rows > MAX_SIDE or columns > MAX_SIDE
            or frames * rows * columns > MAX_PIXELS):
        raise UnusableDicom(path, f"too large: declared size over the limits ({MAX_FRAMES} frames, {MAX_SIDE} "
                                  f"pixels a side, {MAX_PIXELS >> 20} Mi pixels in all)")


def _check_pixel_data(ds: Dataset, path: Path, frames: int) -> None:
    """Refuse a PixelData that disagrees with the header, before any frame is decoded.

    Native: its length is exact. Encapsulated: it holds NumberOfFrames frames, each declaring Rows x Columns x
    SamplesPerPixel in its own header.
    """
    syntax = str(ds.file_meta.TransferSyntaxUID)
    rows, columns, samples = int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1) or 1)
    if syntax in NATIVE:
        per_pixel = 2 if str(ds.PhotometricInterpretation).strip() == "YBR_FULL_422" else samples
        expected = frames * rows * columns * per_pixel * (int(ds.get("BitsAllocated", 8) or 8) // 8)
        raw = next((e for e in _raw_elements(ds) if e.tag == 0x7FE00010), None)  # its value is not read
        length = raw.length if isinstance(raw, RawDataElement) else len(ds.PixelData)
        if length not in (expected, expected + 1):  # + 1: the pad byte of an odd length
            raise UnusableDicom(path, "pixel data length does not match the header")
        return
    try:
        encoded = list(generate_frames(ds.PixelData, number_of_frames=frames))
    except Exception as err:
        raise UnusableDicom(path, "frames in the pixel data do not match NumberOfFrames") from err
    if len(encoded) != frames:
        raise UnusableDicom(path, "frames in the pixel data do not match NumberOfFrames")
    if syntax == RLE:  # the RLE decoder writes into a Rows x Columns buffer: nothing to check beforehand
        return
    for frame in encoded:
        declared = _frame_header_size(frame, jpeg_2000=syntax in JPEG_2000)
        if declared is None:
            raise UnusableDicom(path, f"cannot decode pixel data ({UID(syntax).name}): a frame has no size header")
        if declared != (rows, columns, samples):
            raise UnusableDicom(path, "compressed frame size does not match Rows/Columns")


def _frame_header_size(frame: bytes, *, jpeg_2000: bool) -> tuple[int, int, int] | None:
    """(rows, columns, components) declared by one compressed frame's own header, None if it has none."""
    if jpeg_2000:  # the SIZ segment follows SOC in a codestream (also inside a JP2 file's jp2c box)
        at = frame.find(b"\xff\x4f\xff\x51", 0, 4096)
        if at < 0 or at + 42 > len(frame):
            return None
        xsiz, ysiz, x0, y0 = struct.unpack_from(">IIII", frame, at + 8)
        return ysiz - y0, xsiz - x0, struct.unpack_from(">H", frame, at + 40)[0]
    at = 2 if frame[:2] == b"\xff\xd8" else -1
    while 0 <= at and at + 4 <= len(frame):
        if frame[at] != 0xFF:
            return None
        marker = frame[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
        elif marker in _SOF:
            if at + 10 > len(frame):
                return None
            height, width = struct.unpack_from(">HH", frame, at + 5)
            return height, width, frame[at + 9]
        elif marker == 0xDA:  # start of scan before any frame header
            return None
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:
            at += 2
        else:
            at += 2 + struct.unpack_from(">H", frame, at + 2)[0]
    return None


def _decode(ds: Dataset, source: Path, path: Path, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W) uint8 luma and (H, W) mask of pixels coloured in any frame, one frame decoded at a time.

    Coloured pixels are ECG traces, markers and colour Doppler; they are kept out of the sector fit.
    """
    rows, columns, samples = int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.PhotometricInterpretation).strip()
    bits = int(ds.get("BitsStored", 8) or 8)
    top = float(2 ** min(max(bits, 1), 16) - 1)
    scale = 255.0 / top if bits > 8 else 1.0
    gray = np.empty((frames, rows, columns), dtype=np.uint8)
    coloured = np.zeros((rows, columns), dtype=bool)
    shape = (rows, columns, samples) if samples > 1 else (rows, columns)
    decoded = 0
    try:
        for frame in iter_pixels(source):  # from the file, a frame at a time: no copy of all the encoded data
            if decoded == frames or frame.shape != shape:
                raise UnusableDicom(path, "decoded frames do not match the header")
            for start in range(0, rows, ROW_BLOCK):  # float temporaries of a block of rows, not of the frame
                block = frame[start : start + ROW_BLOCK].astype(np.float32)
                if samples == 3:
                    luma = block @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
                    coloured[start : start + ROW_BLOCK] |= (block.max(-1) - block.min(-1)) * scale > 0.15 * 255
                else:
                    luma = top - block if photometric == "MONOCHROME1" else block
                gray[decoded, start : start + ROW_BLOCK] = np.clip(luma * scale, 0, 255).round().astype(np.uint8)
            decoded += 1
    except UnusableDicom:
        raise
    except Exception as err:  # decoders raise anything from ValueError to NotImplementedError
        name = UID(str(ds.file_meta.TransferSyntaxUID)).name
        raise UnusableDicom(path, f"cannot decode pixel data ({name})") from err
    if decoded != frames:
        raise UnusableDicom(path, "decoded frames do not match the header")
    return gray, coloured


def frame_rate(ds: Dataset) -> float | None:
    """Frames per second from FrameTime (ms), CineRate or RecommendedDisplayFrameRate; None if absent."""
    for keyword, to_fps in (("FrameTime", lambda v: 1000.0 / v), ("CineRate", float),
                            ("RecommendedDisplayFrameRate", float)):
        try:
            value = float(ds.get(keyword, "") or "nan")
        except (TypeError, ValueError, OverflowError):
            continue
        if math.isfinite(value) and value > 0:
            fps = float(to_fps(value))
            return fps if math.isfinite(fps) else math.inf
    return None


__all__ = ["UltrasoundClip", "UnusableDicom", "frame_rate", "input_problem", "pseudonym", "pseudonym_key",
           "read_ultrasound"]
