"""A folder of ultrasound DICOM -> one de-identified site folder in the EchoNet layout (``echoflow data ingest``).

Every file under the DICOM folder is read by `echoflow.data.dicom.read_ultrasound` (header allow-list, burned-in
text removed or the file refused); ``Videos/<hash>.avi``, ``FileList.csv`` and ``ingest_log.txt`` are then built
from scratch, so no header element reaches them but the frame rate, the frame count and the two keyed hashes
below. The PS3.15 profile action for each element read is listed in `echoflow.data.dicom`.

* The video's name is the `pseudonym` (HMAC-SHA256 under the site's secret salt, at least 128 bits) of its
  SOPInstanceUID (of its path inside the folder when it has none), and the patient's that of its PatientID (else
  SOPInstanceUID), so one patient's studies stay linked across ingests that reuse the salt. The split is drawn
  per patient from the patient hash (80/10/10 TRAIN/VAL/TEST).
* **Each input is isolated.** The folder is walked without recursion and without following links to folders,
  at most ``MAX_DEPTH`` folders deep. Any failure on one input (a link, a loop, a name, an encoding, the timing,
  decoding, writing) skips it with one line ``input #N: <reason>`` - numbered by its position in the walk
  (relative paths sorted as bytes), never by path, since hospital paths often carry names or UIDs; the reason
  quotes nothing from the file. Hidden files and folders, and folders nested too deep, get a line too.
* **The output is only ever complete.** Each video is written under a temporary name and renamed; FileList.csv
  and ingest_log.txt are written beside and renamed over the old ones, so a crash leaves the last complete set.

EF comes from an optional CSV with an ``EF`` column keyed by ``SOPInstanceUID`` or ``FileName`` (path
relative to the DICOM folder, base name, or stem). A row whose EF is not a number in 0-100 is skipped with one
line ``ef-csv line N: <reason>`` that never quotes the cell. Clips without EF get a blank EF cell; read such
folders with ``read_cohort(..., require_ef=False)`` for EF-free uses (VAE, image flow, re-id).
"""

from __future__ import annotations

import math
import os
import re
import secrets
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from echoflow.data.dicom import UnusableDicom, pseudonym, pseudonym_key, read_ultrasound
from echoflow.data.echonet import VideoRecord, read_cohort, resize_frames, write_avi, write_filelist
from echoflow.errors import EchoFlowError

MAX_DEPTH = 32  # folder levels under the DICOM folder that are searched
RESIZE_CHUNK = 16  # frames resized at a time, in float32 (64 MiB at 1024^2: big enough for glibc to mmap and return it)
_OLD_PSEUDONYM = re.compile(r"[0-9a-f]{16}")  # sha256(salt + ID)[:16], written before HMAC pseudonyms


@dataclass
class IngestReport:
    """What ``ingest_dicom`` did.

    Attributes:
        records: the clips written. skipped: one line per unusable input, e.g. ``"input #3: not DICOM"``.
        reasons: skip counts by reason. notes: other lines (EF rows skipped, a random salt used).
    """

    records: list[VideoRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: clips written, EF known, inputs skipped by reason."""
        known = sum(not math.isnan(r.ef) for r in self.records)
        why = ", ".join(f"{n} {reason}" for reason, n in self.reasons.most_common())
        return f"ingested {len(self.records)} clips ({known} with EF); skipped {len(self.skipped)}" + (
            f" ({why})" if why else "")

    def skip(self, number: int, reason: str) -> None:
        """Record input ``number`` as skipped for ``reason`` (worded without any path or value from the file)."""
        self.skipped.append(f"input #{number}: {reason}")
        self.reasons[reason.split(" (")[0].split(":")[0]] += 1  # "too large: declared ..." -> "too large"


@dataclass(frozen=True)
class _Input:
    """One entry of the walk: its path, its relative path as bytes (the sort key), a reason to skip it."""

    path: Path
    key: bytes
    problem: str | None = None


def ingest_dicom(dicom_dir: Path, out: Path, *, salt: str | bytes | None, size: int = 112,
                 ef_csv: Path | None = None, accept_burned_in_risk: bool = False) -> IngestReport:
    """Convert every file under ``dicom_dir`` to ``out/Videos/<hash>.avi`` + ``out/FileList.csv``.

    Rows already in ``out/FileList.csv`` are kept (so batches can be ingested one after another with the same
    salt). Split is drawn per patient from the patient hash (80/10/10 TRAIN/VAL/TEST). The skip lines, notes
    and the summary also go to ``out/ingest_log.txt``.

    Args:
        dicom_dir: folder searched (see module docstring); every entry but a searched folder is an input.
        out: output site folder (its name is the site name).
        salt: the site's secret, at least 16 bytes; None draws a random one (noted: no link to other ingests).
        size: output frame height = width, pixels.
        ef_csv: optional EF table (see module docstring).
        accept_burned_in_risk: ingest single frames and low-motion cines, whose burned-in text cannot be told
            from the image (`echoflow.data.dicom_pixels`); refused with one line each otherwise.

    Raises:
        EchoFlowError: ``dicom_dir`` is not a folder, the salt is under 16 bytes, the EF table is unusable,
            ``out`` holds clips named by the older pseudonyms, or FileList.csv cannot be written.
    """
    report = IngestReport()
    if salt is None:
        salt = secrets.token_bytes(32)
        report.notes.append("warning: no --salt given: used a one-off random key, so these patients will not "
                            "link to other ingests")
    key = pseudonym_key(salt)
    if not dicom_dir.is_dir():
        raise EchoFlowError(f"{dicom_dir}: not a folder")
    ef_table = _read_ef_table(ef_csv, report) if ef_csv is not None else {}
    kept = read_cohort(out, require_ef=False).records if (out / "FileList.csv").is_file() else []
    if any(_OLD_PSEUDONYM.fullmatch(r.file_name) for r in kept):
        raise EchoFlowError(f"{out}: holds clips named by an older ingest's pseudonyms (sha256, 16 characters), "
                            "which link to no new one: ingest into a new folder")
    names: set[str] = set()
    for number, item in enumerate(walk(dicom_dir), start=1):
        if item.problem is not None:
            report.skip(number, item.problem)
            continue
        try:
            record = _ingest_one(item, dicom_dir, out, key, size, ef_table, names, accept_burned_in_risk)
        except UnusableDicom as err:
            report.skip(number, err.reason)
        except Exception as err:  # isolation: nothing one input does stops the others
            report.skip(number, f"unexpected error ({type(err).__name__})")
        else:
            names.add(record.file_name)
            report.records.append(record)
    _publish(out, [r for r in kept if r.file_name not in names] + report.records,
             [*report.notes, *report.skipped, report.summary()])
    return report


def walk(root: Path) -> list[_Input]:
    """Every input under ``root``, sorted by relative path as bytes.

    Walked without recursion, at most ``MAX_DEPTH`` folders deep; links to folders are not followed (they are
    inputs, refused as no regular file). Hidden files and folders and too-deep folders are inputs that carry
    their reason to be skipped.
    """
    found: list[_Input] = []
    stack: list[tuple[Path, bytes, int]] = [(root, b"", 0)]
    while stack:
        folder, prefix, depth = stack.pop()
        try:
            with os.scandir(folder) as entries:
                children = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
        except OSError as err:
            found.append(_Input(folder, prefix, f"unreadable folder ({type(err).__name__})"))
            continue
        for name, is_folder in children:
            key = prefix + os.fsencode(name)
            path = folder / name
            if not is_folder:
                found.append(_Input(path, key, "hidden file, not read" if name.startswith(".") else None))
            elif name.startswith("."):
                found.append(_Input(path, key, "hidden folder, not searched"))
            elif depth + 1 > MAX_DEPTH:
                found.append(_Input(path, key, f"folder nested deeper than {MAX_DEPTH} levels, not searched"))
            else:
                stack.append((path, key + b"/", depth + 1))
    return sorted(found, key=lambda item: item.key)


def _ingest_one(item: _Input, dicom_dir: Path, out: Path, key: bytes, size: int, ef_table: dict[str, float],
                names: set[str], accept_burned_in_risk: bool) -> VideoRecord:
    clip = read_ultrasound(item.path, root=dicom_dir, accept_burned_in_risk=accept_burned_in_risk)
    name = pseudonym(key, b"instance:" + (clip.instance_uid.encode("utf-8", "surrogateescape") or item.key))
    if name in names:
        raise UnusableDicom(item.path, "duplicate SOPInstanceUID")
    patient = pseudonym(key, "patient:" + (clip.patient_id or clip.instance_uid))
    relative = os.fsdecode(item.key)
    keys = (clip.instance_uid, relative, item.path.name, item.path.stem)
    ef = next((ef_table[k] for k in keys if k in ef_table), math.nan)
    frames = clip.frames
    resized = frames if frames.shape[1:] == (size, size) else np.concatenate(
        [resize_frames(frames[i : i + RESIZE_CHUNK], size=size) for i in range(0, len(frames), RESIZE_CHUNK)])
    video = out / "Videos" / f"{name}.avi"
    partial = out / "Videos" / f".partial-{name}.avi"
    try:
        write_avi(partial, resized, clip.fps)
        partial.replace(video)
    except Exception as err:
        partial.unlink(missing_ok=True)
        raise UnusableDicom(item.path, f"cannot write the video ({type(err).__name__})") from err
    bucket = int(patient, 16) % 10
    split = "TRAIN" if bucket < 8 else "VAL" if bucket == 8 else "TEST"
    return VideoRecord(name, video, ef, math.nan, math.nan, clip.fps, len(resized), size, size, split, patient,
                       out.resolve().name)


def _publish(out: Path, records: list[VideoRecord], log: list[str]) -> None:
    """Write FileList.csv and ingest_log.txt beside ``out``'s and rename them over: never half-written."""
    (out / "Videos").mkdir(parents=True, exist_ok=True)  # a folder read_cohort accepts, even with no clip yet
    try:
        with tempfile.TemporaryDirectory(prefix=".ingest-", dir=out) as scratch:
            write_filelist(Path(scratch), records)
            (Path(scratch) / "ingest_log.txt").write_text("\n".join(log) + "\n")
            os.replace(Path(scratch) / "FileList.csv", out / "FileList.csv")
            os.replace(Path(scratch) / "ingest_log.txt", out / "ingest_log.txt")
    except OSError as err:
        raise EchoFlowError(f"{out}: cannot write FileList.csv ({type(err).__name__})") from err


def _read_ef_table(path: Path, report: IngestReport) -> dict[str, float]:
    """``key -> EF`` from a CSV with ``EF`` and ``SOPInstanceUID`` and/or ``FileName`` columns.

    A row whose EF is no number in 0-100 is skipped with a note that does not quote it.
    """
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise EchoFlowError(f"--ef-csv: unreadable EF table ({type(err).__name__})") from err
    keys = [c for c in ("SOPInstanceUID", "FileName") if c in table.columns]
    if "EF" not in table.columns or not keys:
        raise EchoFlowError("--ef-csv: EF table needs an EF column and a SOPInstanceUID or FileName column")
    efs: dict[str, float] = {}
    for row_number, row in enumerate(table.to_dict("records"), start=2):
        try:
            ef = float(str(row["EF"]))
        except (ValueError, OverflowError):
            ef = math.nan
        if not math.isfinite(ef):
            report.notes.append(f"ef-csv line {row_number}: EF is not a number, row skipped")
        elif not 0.0 <= ef <= 100.0:
            report.notes.append(f"ef-csv line {row_number}: EF outside 0-100, row skipped")
        else:
            efs.update({str(row[k]).strip(): ef for k in keys if str(row[k]).strip()})
    return efs
