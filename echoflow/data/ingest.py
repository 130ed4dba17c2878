"""A folder of ultrasound DICOM -> one de-identified site folder in the EchoNet layout (``echoflow data ingest``).

Every file under the DICOM folder is read by `echoflow.data.dicom.read_ultrasound` (header allow-list, burned-in
text removed); ``Videos/<hash>.avi``, ``FileList.csv`` and ``ingest_log.txt`` are then built from scratch, so no
header element reaches them but the frame rate, the frame count and the two salted hashes below (and, in a skip
line, a modality or SOP class name). The PS3.15 profile action for each element read is listed in
`echoflow.data.dicom`.

* The video's name is the `pseudonym` (salted SHA-256) of its SOPInstanceUID (of its path inside the folder
  when it has none), and the patient's that of its PatientID (else SOPInstanceUID), so one patient's studies stay
  linked across ingests that reuse the secret salt. The split is drawn per patient from the patient hash
  (80/10/10 TRAIN/VAL/TEST).
* Skipped inputs are named by their position in the sorted file list (``input #3``), never by path, because
  hospital paths and file names often carry names or UIDs.

EF comes from an optional CSV with an ``EF`` column keyed by ``SOPInstanceUID`` or ``FileName`` (path
relative to the DICOM folder, base name, or stem). Clips without EF get a blank EF cell; read such folders
with ``read_cohort(..., require_ef=False)`` for EF-free uses (VAE, image flow, re-id).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from echoflow.data.dicom import UnusableDicom, pseudonym, read_ultrasound
from echoflow.data.echonet import VideoRecord, read_cohort, resize_frames, write_avi, write_filelist
from echoflow.errors import EchoFlowError


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
