import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)
from typer.testing import CliRunner

from echoflow.cli import app, main
from echoflow.data.dicom import pseudonym, read_ultrasound
from echoflow.data.echonet import read_avi, read_cohort
from echoflow.data.ingest import ingest_dicom

CANARIES = {
    "PatientName": "CANARY^PHI", "PatientID": "CANARY-ID-4711", "PatientBirthDate": "19450607",
    "StudyDate": "20240229", "StudyTime": "101112", "InstitutionName": "CANARY GENERAL HOSPITAL",
    "DeviceSerialNumber": "SN-CANARY-0042", "AccessionNumber": "ACC-CANARY-77",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.4711001", "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.4711002",
}
PHI_VRS = ("PN", "DA", "TM", "DT", "UI", "AE")
PHI_KEYWORDS = ("PatientID", "OtherPatientIDs", "InstitutionName", "InstitutionAddress", "StationName",
                "DeviceSerialNumber", "AccessionNumber", "PerformedProcedureStepID", "StudyID")
SALT = "site-secret-of-at-least-16-bytes"
PUBLIC_UIDS = ("SOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID", "ImplementationClassUID")


def real_cine() -> Path:
    """pydicom's real A4C cine, only if it ships with the package (never downloaded)."""
    try:
        return Path(get_testdata_file("examples_ybr_color.dcm", download=False))
    except (TypeError, ValueError, OSError):
        pytest.skip("examples_ybr_color.dcm is not in the installed pydicom package")


def scan(frames: int = 12, size: tuple[int, int] = (96, 128), *, seed: int = 0) -> np.ndarray:
    """A moving speckle fan (rows 20-89, columns 30-109) + static burned-in 'text' at the top left."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((frames, *size), dtype=np.uint8)
    pixels[:, 20:90, 30:110] = rng.integers(40, 250, (frames, 70, 80))
    pixels[:, 2:9, 2:24] = 255
    return pixels


def write_us(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", jpeg: bool = False,
             modality: str = "US", instance: str = "1.2.826.0.1.3680043.8.498.4711100", pixel_data: bool = True,
             regions: tuple[int, int, int, int] | None = None, corrupt: bool = False, jpeg_quality: int = 95,
             **tags: str) -> Path:
    """A small ultrasound DICOM with canary PHI; ``pixels`` (T, H, W[, 3]) uint8, T=1 -> single frame.

    ``corrupt``: JPEG transfer syntax whose frames are not JPEG.
    """
    multi = len(pixels) > 1
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage if multi else UltrasoundImageStorage
    if modality != "US":
        meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = instance
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg or corrupt else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, instance, modality
    for keyword, value in {**CANARIES, **tags}.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = pixels.shape[1:3]
    ds.SamplesPerPixel = 3 if pixels.ndim == 4 else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if pixels.ndim == 4:
        ds.PlanarConfiguration = 0
    if multi:
        ds.NumberOfFrames, ds.FrameTime = len(pixels), "40.0"
    if regions is not None:
        region = Dataset()
        region.RegionSpatialFormat, region.RegionDataType = 1, 1
        (region.RegionLocationMinY0, region.RegionLocationMaxY1, region.RegionLocationMinX0,
         region.RegionLocationMaxX1) = regions
        ds.SequenceOfUltrasoundRegions = [region]
    if pixel_data and corrupt:
        ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG stream" * 8 for _ in pixels])
    elif pixel_data and jpeg:
        encoded = []
        for frame in pixels:
            buffer = BytesIO()
            Image.fromarray(frame).save(buffer, format="JPEG", quality=jpeg_quality)
            encoded.append(buffer.getvalue())
        ds.PixelData = encapsulate(encoded)
    elif pixel_data:
        ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def phi_values(path: Path) -> set[str]:
    """Every identifying value in a DICOM file: names, dates, times, instance UIDs, IDs, places, devices."""
    ds = pydicom.dcmread(path)
    values: set[str] = set()

    def visit(dataset: Dataset) -> None:
        for element in dataset:
            if element.VR == "SQ":
                for item in element.value:
                    visit(item)
            elif (element.VR in PHI_VRS or element.keyword in PHI_KEYWORDS) and element.keyword not in PUBLIC_UIDS:
                for value in element.value if element.VM > 1 else [element.value]:
                    if len(str(value).strip()) >= 3:
                        values.add(str(value).strip())

    visit(ds.file_meta)
    visit(ds)
    return values


def assert_no_phi(out: Path, secrets: set[str], log: str = "") -> None:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files
    for secret in secrets:
        needle = secret.encode()
        for file in files:
            assert needle not in file.read_bytes(), f"{secret!r} leaked into {file.name}"
            assert secret not in file.name
        assert secret not in log


def test_pydicom_decodes_jpeg_baseline_with_pylibjpeg() -> None:
    frames = pixel_array(real_cine(), decoding_plugin="pylibjpeg")
    assert frames.shape == (30, 240, 320, 3) and frames.dtype == np.uint8


def test_real_cine_ingests_without_phi(tmp_path: Path) -> None:
    source = real_cine()
    (tmp_path / "in" / "PLA_204").mkdir(parents=True)
    (tmp_path / "in" / "PLA_204" / source.name).write_bytes(source.read_bytes())
    clip = read_ultrasound(source)
    assert len(clip.frames) == 30 and clip.fps == 30.0
    height, width = clip.frames.shape[1:]
    assert 120 < height < 240 and 100 < width < 260  # burned-in text, toolbar and depth scale cut away
    report = ingest_dicom(tmp_path / "in", tmp_path / "out", salt="pepper-7-site-secret-key", size=112)
    [record] = report.records
    assert (record.num_frames, record.fps, record.height) == (30, 30.0, 112)
    assert read_avi(record.path).shape == (30, 112, 112)
    table = pd.read_csv(tmp_path / "out" / "FileList.csv")
    assert table["FPS"].tolist() == [30.0] and table["NumberOfFrames"].tolist() == [30] and table["EF"].isna().all()
    assert record.patient_id == pseudonym("pepper-7-site-secret-key", "patient:204")
    secrets = phi_values(source) | {"pepper-7-site-secret-key"}
    assert {"PLA", "204", "20160503"} <= secrets
    assert_no_phi(tmp_path / "out", secrets, "\n".join([*report.skipped, report.summary()]))


@pytest.mark.parametrize(("photometric", "jpeg", "frames"),
                         [("MONOCHROME2", False, 12), ("MONOCHROME2", True, 12), ("RGB", False, 1),
                          ("RGB", False, 6), ("MONOCHROME2", False, 1)])
def test_synthetic_variants_crop_the_fan(tmp_path: Path, photometric: str, jpeg: bool, frames: int) -> None:
    pixels = scan(frames)
    if photometric == "RGB":
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
        pixels[:, 92:95, :, 1] = 200  # a green ECG trace below the fan
    clip = read_ultrasound(write_us(tmp_path / "a.dcm", pixels, photometric=photometric, jpeg=jpeg),
                           accept_burned_in_risk=frames == 1)  # a single frame is refused without
    assert len(clip.frames) == frames and clip.fps == (25.0 if frames > 1 else 1.0)
    assert clip.frames.shape[1:] == (70, 80)  # exactly the fan: text and ECG gone
    if not jpeg:
        np.testing.assert_array_equal(clip.frames, pixels[:, 20:90, 30:110, ..., 0] if pixels.ndim == 4
                                      else pixels[:, 20:90, 30:110])


def test_ultrasound_regions_win_when_inside_the_image(tmp_path: Path) -> None:
    clip = read_ultrasound(write_us(tmp_path / "a.dcm", scan(), regions=(10, 59, 40, 99)))
    assert clip.frames.shape == (12, 40, 60)  # the fan inside the region: rows 20-59, columns 40-99


def test_bad_files_are_skipped_one_line_each_and_the_rest_ingest(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write_us(src / "good_a.dcm", scan(), instance="1.2.826.0.1.3680043.8.498.1")
    write_us(src / "good_b.dcm", scan(1), instance="1.2.826.0.1.3680043.8.498.2",
             StudyDate="20240301")  # the same patient's second study
    write_us(src / "good_c.dcm", scan(seed=3), instance="1.2.826.0.1.3680043.8.498.3", PatientID="OTHER-CANARY")
    write_us(src / "ct.dcm", scan(), modality="CT", instance="1.2.826.0.1.3680043.8.498.4")
    write_us(src / "nopixels.dcm", scan(), pixel_data=False, instance="1.2.826.0.1.3680043.8.498.5")
    write_us(src / "badsyntax.dcm", scan(), corrupt=True, instance="1.2.826.0.1.3680043.8.498.6")
    (src / "notes.txt").write_text("CANARY^PHI called on 20240229\n")
    pd.DataFrame({"SOPInstanceUID": ["1.2.826.0.1.3680043.8.498.1", ""], "FileName": ["", "good_c.dcm"],
                  "EF": [62.5, 41.0]}).to_csv(tmp_path / "ef.csv", index=False)
    result = CliRunner().invoke(app, ["data", "ingest", str(src), "--out", str(tmp_path / "site_x"),
                                      "--ef-csv", str(tmp_path / "ef.csv"), "--size", "32", "--salt", SALT,
                                      "--accept-burned-in-risk"])  # good_b is a single frame
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.output.splitlines() if line.startswith("input #")]
    assert sorted(skipped) == ["input #1: cannot decode pixel data (JPEG Baseline (Process 1)): a frame has no size "
                               "header",
                               "input #2: modality CT, not US", "input #6: no pixel data", "input #7: not DICOM"]
    assert "ingested 3 clips (2 with EF); skipped 4" in result.output
    cohort = read_cohort(tmp_path / "site_x", require_ef=False)
    assert cohort.problems == [] and len(cohort.records) == 3
    by_ef = {r.ef if r.ef == r.ef else None: r for r in cohort.records}
    assert set(by_ef) == {62.5, 41.0, None} and by_ef[None].num_frames == 1
    assert by_ef[62.5].patient_id == by_ef[None].patient_id != by_ef[41.0].patient_id  # studies stay linked
    assert all(r.site == "site_x" and r.height == r.width == 32 for r in cohort.records)
    secrets = {SALT, *CANARIES.values(), "OTHER-CANARY", "20240301"} | {f"1.2.826.0.1.3680043.8.498.{i}" for i in
                                                                       range(1, 7)}
    assert_no_phi(tmp_path / "site_x", secrets, result.output)
    assert len(read_cohort(tmp_path / "site_x").problems) == 1  # EF-free clip is a problem only when EF is required


def test_cli_ingest_of_a_missing_folder_fails_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["echoflow", "data", "ingest", str(tmp_path / "nope"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: not a folder\n"
