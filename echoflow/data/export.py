"""Exports of a released dataset folder (EchoNet layout) into formats that existing tools read.

* ``export_echonet``: the EchoNet-Dynamic layout that their own loader (``echonet.datasets.Echo``) reads unchanged.
  Their loader keeps only FileList rows whose FileName has no extension (it appends ``.avi``), compares
  ``Split`` in upper case, decodes with ``cv2.VideoCapture`` (OpenCV's FFmpeg reads our lossless FFV1 AVIs, so
  videos are copied byte for byte), and drops every video with fewer than two traced frames in
  ``VolumeTracings.csv``. Tracings in the source are kept; a video without them (every generated video) gets
  two placeholder rows (a zero-length segment at the image centre, first and last frame), so EF, EDV and ESV
  targets load while LargeTrace/SmallTrace masks come out empty: do not train segmentation on placeholders.
  Blank ESV/EDV load as NaN and only matter if asked for as targets.
* ``export_dicom``: one Ultrasound Multi-frame Image Storage file per video (MONOCHROME2, 8-bit, uncompressed),
  marked synthetic in PatientName, descriptions and ImageComments (with the EF), with fresh UIDs and no PHI.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import pydicom.uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag

from echoflow.data.echonet import VideoRecord, read_avi, read_cohort, write_filelist
from echoflow.errors import EchoFlowError

TRACING_COLUMNS = ["FileName", "X1", "Y1", "X2", "Y2", "Frame"]
SYNTHETIC_MARKER = "SYNTHETIC - EchoFlow generated, no real patient"


@dataclass
class ExportResult:
    """What an export wrote.

    Attributes:
        files: the written video or DICOM files, in FileList order.
        skipped: one line ``"<file>: <problem>"`` per source row not exported.
        placeholder_traces: videos given placeholder tracings (EchoNet export only).
    """

    files: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    placeholder_traces: int = 0

    def summary(self, what: str) -> str:
        """One line: how many ``what`` were written and skipped."""
        extra = f"; {self.placeholder_traces} with placeholder tracings" if self.placeholder_traces else ""
        return f"exported {len(self.files)} {what}; skipped {len(self.skipped)}{extra}"


def _source(src: Path, dst: Path) -> tuple[list[VideoRecord], list[str]]:
    """The exportable rows of ``src`` (EF required) and one line per skipped row; ``dst`` must be elsewhere."""
    if dst.resolve() == src.resolve():
        raise EchoFlowError(f"{dst}: output folder must differ from the source folder")
    cohort = read_cohort(src)
    if not cohort.records:
        raise EchoFlowError(f"{src / 'FileList.csv'}: no exportable videos ({len(cohort.problems)} problem rows)")
    return cohort.records, cohort.problems


def export_echonet(src: Path, dst: Path) -> ExportResult:
    """Write ``dst/{Videos/*.avi, FileList.csv, VolumeTracings.csv}`` for EchoNet-Dynamic's ``Echo`` dataset.

    Args:
        src: a released folder in our EchoNet layout (or any cohort with EF known).
        dst: output folder, created if needed.

    Returns:
        The copied videos, the skipped rows (bad rows, names EchoNet would drop), placeholder count.
    """
    records, skipped = _source(src, dst)
    result = ExportResult(skipped=skipped)
    kept: list[VideoRecord] = []
    for record in records:
        if os.path.splitext(record.file_name)[1]:  # EchoNet reads "a.b" as a file with suffix ".b" and drops it
            result.skipped.append(f"{record.path}: FileName has a dot; EchoNet's loader would drop it")
            continue
        if record.num_frames < 2:
            result.skipped.append(f"{record.path}: {record.num_frames} frame(s); EchoNet needs 2 traced frames")
            continue
        target = dst / "Videos" / f"{record.file_name}.avi"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(record.path, target)
        kept.append(replace(record, path=target))
        result.files.append(target)
    tracings, result.placeholder_traces = _tracings(src / "VolumeTracings.csv", kept)
    tracings.to_csv(dst / "VolumeTracings.csv", index=False)
    write_filelist(dst, kept)
    return result


def _tracings(path: Path, records: list[VideoRecord]) -> tuple[pd.DataFrame, int]:
    """Source tracings of ``records`` plus placeholders where a video has < 2 traced frames; placeholder count."""
    names = {f"{r.file_name}.avi" for r in records}
    table = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=TRACING_COLUMNS)
    if list(table.columns) != TRACING_COLUMNS:
        raise EchoFlowError(f"{path}: columns {list(table.columns)}, expected {TRACING_COLUMNS}")
    table = table[table["FileName"].isin(names)]
    traced = table.groupby("FileName")["Frame"].nunique()
    missing = [r for r in records if traced.get(f"{r.file_name}.avi", 0) < 2]
    rows = [(f"{r.file_name}.avi", r.width / 2, r.height / 2, r.width / 2, r.height / 2, frame)
            for r in missing for frame in (0, r.num_frames - 1)]
    placeholders = pd.DataFrame(rows, columns=TRACING_COLUMNS)
    table = table[~table["FileName"].isin({row[0] for row in rows})]
    return pd.concat([table, placeholders], ignore_index=True) if len(table) else placeholders, len(missing)


def export_dicom(src: Path, dst: Path) -> ExportResult:
    """Write ``dst/<FileName>.dcm`` per video: Ultrasound Multi-frame, MONOCHROME2, 8-bit, marked synthetic.

    Args:
        src: a released folder in our EchoNet layout.
        dst: output folder, created if needed.

    Returns:
        The written DICOM files and the skipped rows.
    """
    records, skipped = _source(src, dst)
    result = ExportResult(skipped=skipped)
    dst.mkdir(parents=True, exist_ok=True)
    for number, record in enumerate(records, start=1):
        try:
            frames = read_avi(record.path)
        except EchoFlowError as err:
            result.skipped.append(str(err))
            continue
        target = dst / f"{record.file_name}.dcm"
        ultrasound_dataset(frames.tobytes(), shape=frames.shape, fps=record.fps, ef=record.ef,
                           name=record.file_name, number=number).save_as(target, enforce_file_format=True)
        result.files.append(target)
    return result


def ultrasound_dataset(pixels: bytes, *, shape: tuple[int, ...], fps: float, ef: float, name: str,
                       number: int = 1) -> Dataset:
    """An Ultrasound Multi-frame Image Storage dataset of one synthetic video, fresh UIDs, no PHI.

    Args:
        pixels: (T, H, W) uint8 frames as bytes, row-major.
        shape: ``(T, H, W)``.
        fps: frames per second (FrameTime = 1000 / fps ms, CineRate = fps rounded).
        ef: the EF the video was generated at, percent 0-100 (NaN: unknown), written to ImageComments.
        name: the video's name; becomes PatientID and PatientName ``SYNTHETIC^<name>``.
        number: InstanceNumber and SeriesNumber.
    """
    frames, rows, columns = shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.Modality, ds.Manufacturer, ds.ImageType = "US", "EchoFlow", ["DERIVED", "PRIMARY"]
    ds.PatientName, ds.PatientID = f"SYNTHETIC^{name}", name
    ds.PatientBirthDate = ds.PatientSex = ds.StudyDate = ds.StudyTime = ds.ReferringPhysicianName = ""
    ds.StudyID = ds.AccessionNumber = ""
    ds.PatientIdentityRemoved, ds.BurnedInAnnotation = "YES", "NO"
    ds.StudyDescription = ds.SeriesDescription = SYNTHETIC_MARKER
    ds.ImageComments = SYNTHETIC_MARKER + (f"; requested EF {ef:.1f} %" if math.isfinite(ef) else "; EF unknown")
    ds.SeriesNumber = ds.InstanceNumber = number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "00"
    ds.FrameTime = f"{1000.0 / fps:.4f}"
    ds.CineRate = ds.RecommendedDisplayFrameRate = round(fps)
    ds.FrameIncrementPointer = Tag("FrameTime")
    region = Dataset()  # the whole frame is image: no burned-in text, no ECG trace to crop away
    region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = columns - 1, rows - 1
    ds.SequenceOfUltrasoundRegions = [region]
    ds.PixelData = pixels
    return ds
