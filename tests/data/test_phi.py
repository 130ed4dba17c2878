"""PHI never leaves a site: canary PHI in DICOM headers, file names and burned-in pixels reaches no output.

Synthetic DICOMs carry canary strings in every identifying element we know of, in their file and folder names,
and as bright text-like blocks burned into the pixels outside the ultrasound image. They go through ingest, site
summary and loading, a short training run logged to MLflow (config included) and both exports; then every byte
of every file under the work folder and the MLflow store is searched (case-insensitive) for every canary.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from echoflow.cli import app
from echoflow.data.dicom import pseudonym, read_ultrasound
from echoflow.data.echonet import read_avi, resize_frames
from echoflow.data.sites import load_site
from tests.data.test_dicom import write_us

NAME = "Canaryphyl^Phyllis^Q"
PHI = {
    "PatientName": NAME, "PatientID": "CANARYPID4711", "PatientBirthDate": "19450607",
    "InstitutionName": "Canary Memorial Hospital", "InstitutionAddress": "7 Canarystreet, Birdtown",
    "ReferringPhysicianName": "Canaryreferrer^Rita", "PerformingPhysicianName": "Canaryperformer^Paul",
    "OperatorsName": "Canaryoperator^Olga", "AccessionNumber": "CANARYACC77", "StudyID": "CANARYSTUDY5",
    "StudyDate": "20240229", "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.4711001",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.4711002", "DeviceSerialNumber": "SN-CANARY-0042",
    "StationName": "CANARYSTATION",
}
INSTANCES = [f"1.2.826.0.1.3680043.8.498.47119{i}" for i in range(3)]
FOLDER, FILE_STEM = "Canaryphyl_Phyllis_CANARYPID4711", "canaryphyl_19450607_echo"
SIZE, SIZE_OUT = (96, 128), 32
FAN = (slice(20, 90), slice(30, 110))  # rows, columns of the ultrasound image (and of its region, when given)
TEXT = 255  # burned-in text; the echo signal below never reaches it


def canaries(salt: str) -> list[bytes]:
    parts = {part for value in PHI.values() for part in value.replace(",", "^").split("^") if len(part) >= 5}
    return sorted({s.lower().encode() for s in [*PHI.values(), *parts, *INSTANCES, FOLDER, FILE_STEM, salt]})


def burn_text(pixels: np.ndarray, text: bytes, row: int, column: int) -> None:
    """``text`` as a bitmap of 2x2-pixel blocks (one column of 8 bits per byte), bright, in every frame."""
    bits = np.unpackbits(np.frombuffer(text, dtype=np.uint8)).reshape(-1, 8).T.astype(bool)
    block = np.kron(bits, np.ones((2, 2), dtype=bool))
    pixels[:, row : row + block.shape[0], column : column + block.shape[1]][:, block] = TEXT


def cine(seed: int, *, sector: bool, frames: int = 12) -> np.ndarray:
    """Moving speckle (40-249) in the fan, the whole box or only a sector of it, canary text burned in around it.

    With ``sector``, the box's top corners stay black and still, and one canary is burned into the top-left
    corner *inside* the box: only blanking the still pixels can remove that one.
    """
    rng = np.random.default_rng(seed)
    pixels = np.zeros((frames, *SIZE), dtype=np.uint8)
    speckle = rng.integers(40, 250, (frames, 70, 80), dtype=np.uint8)
    if sector:
        rows, columns = np.mgrid[0:70, 0:80]
        speckle[:, np.abs(columns - 40) > 12 + rows * 40 // 69] = 0  # widest at the bottom: the box stays 70x80
    pixels[:, FAN[0], FAN[1]] = speckle
    burn_text(pixels, b"CANARYPID4711"[:6], 2, 2)  # top left, over the patient banner's place
    burn_text(pixels, b"19450607", 60, 112)  # right of the image
    if sector:
        burn_text(pixels, b"CANARY", 21, 31)
    return pixels


def hospital(root: Path) -> tuple[Path, Path]:
    """Three DICOMs (region + cine, sector cine with no region, region + single frame) and an EF table."""
    folder = root / "dicom" / FOLDER
    folder.mkdir(parents=True)
    region = (FAN[0].start, FAN[0].stop - 1, FAN[1].start, FAN[1].stop - 1)
    write_us(folder / f"{FILE_STEM}_0.dcm", cine(0, sector=False), instance=INSTANCES[0], regions=region, **PHI)
    write_us(folder / f"{FILE_STEM}_1.dcm", cine(1, sector=True), instance=INSTANCES[1], BurnedInAnnotation="YES",
             **PHI)
    write_us(folder / f"{FILE_STEM}_2.dcm", cine(2, sector=False, frames=1), instance=INSTANCES[2], regions=region,
             BurnedInAnnotation="YES", **PHI)
    ef_csv = root / "ef_canaryphyl.csv"
    pd.DataFrame({"FileName": [f"{FOLDER}/{FILE_STEM}_{i}.dcm" for i in range(3)], "EF": [35.0, 55.0, 65.0]}
                 ).to_csv(ef_csv, index=False)
    return folder.parent, ef_csv


def train_salt() -> str:
    """A salt whose patient hash lands in TRAIN (80 % of them do), so the training step has data."""
    return next(salt for salt in (f"canarysalt-site-secret-{i}" for i in range(100))
                if int(pseudonym(salt, "patient:" + PHI["PatientID"]), 16) % 10 < 8)


def test_burned_in_text_is_cut_or_blanked(tmp_path: Path) -> None:
    folder = hospital(tmp_path)[0] / FOLDER
    with_region = read_ultrasound(folder / f"{FILE_STEM}_0.dcm")
    assert np.array_equal(with_region.frames, cine(0, sector=False)[:, FAN[0], FAN[1]])
    fallback = read_ultrasound(folder / f"{FILE_STEM}_1.dcm").frames
    original = cine(1, sector=True)
    assert fallback.shape[1:] == (70, 80) and fallback.max() < TEXT  # cropped to the fan's box...
    inside = original[:, FAN[0], FAN[1]] == TEXT
    assert inside.sum() > 50 and not fallback[inside].any()  # ...and the canary inside that box blanked
    moving = original[:, FAN[0], FAN[1]].std(0) > 0
    assert np.array_equal(fallback[:, moving], original[:, FAN[0], FAN[1]][:, moving])  # echo signal untouched
    assert read_ultrasound(folder / f"{FILE_STEM}_2.dcm", accept_burned_in_risk=True).frames.max() < TEXT


@pytest.mark.filterwarnings("ignore")
def test_no_canary_reaches_any_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs, ef_csv = hospital(tmp_path / "hospital")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # MLflow's default artifact root (./mlruns) lands in the work folder too
    salt, site = train_salt(), work / "site_a"
    runner, said = CliRunner(), []

    def run(*args: str) -> None:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, result.output
        said.append(result.output)

    run("data", "ingest", str(inputs), "--out", str(site), "--ef-csv", str(ef_csv), "--size", str(SIZE_OUT),
        "--salt", salt, "--accept-burned-in-risk")  # the third file is a single frame
    assert "ingested 3 clips (3 with EF); skipped 0" in said[-1]
    run("data", "summary", str(site))
    loaded = load_site(site, size=SIZE_OUT, splits=("TRAIN", "VAL", "TEST"))
    assert len(loaded.videos) == 3 and loaded.problems == []
    assert max(int(video.max()) for video in loaded.videos) < TEXT  # no burned-in pixel in what trains
    first = next(r for r in loaded.records if r.ef == 35.0)
    expected = resize_frames(cine(0, sector=False)[:, FAN[0], FAN[1]], size=SIZE_OUT)
    assert np.array_equal(read_avi(first.path), expected)
    run("train", "ef", "--quiet", f"workdir={work}", "data.source=echonet", f"data.roots=[{site}]",
        f"data.size={SIZE_OUT}", "data.clip_frames=4", "model.ef.channels=[4,8,8,8]", "train.ef.optim.steps=2",
        "train.ef.optim.batch_size=2", "train.ef.optim.checkpoint_every=1", "mlflow.tracking_uri=sqlite:///mlflow.db")
    assert (work / "ef" / "model.safetensors").is_file() and (work / "mlflow.db").is_file()
    assert list(work.glob("mlruns/**/config.yaml"))  # the MLflow run logged its config as an artifact
    run("export", "echonet", str(site), "--out", str(work / "export_echonet"))
    run("export", "dicom", str(site), "--out", str(work / "export_dicom"))

    files = [path for path in work.rglob("*") if path.is_file()]
    assert len(files) >= 15  # site, ingest log, checkpoint, weights, MLflow store and artifacts, both exports
    leaks = [f"{needle.decode()} in {path.relative_to(work)}" for path in files
             for content in [path.read_bytes().lower() + str(path.relative_to(work)).lower().encode()]
             for needle in canaries(salt) if needle in content]
    printed = "".join(said).lower().encode()
    leaks += [f"{needle.decode()} in CLI output" for needle in canaries(salt) if needle in printed]
    assert leaks == []


def test_the_canary_search_finds_a_leak() -> None:
    """Guards the search above: a canary in any case, anywhere in a binary file or a file name, is found."""
    needles = canaries("zz-salt-zz")
    assert {b"canaryphyl", b"19450607", b"canarypid4711", b"zz-salt-zz"} <= set(needles)
    blob = b"\x00\xff" + NAME.upper().encode() + b"\x01"
    assert [n for n in needles if n in blob.lower()] == [b"canaryphyl", NAME.lower().encode(), b"phyllis"]
    assert [n for n in needles if n in b"\x00\xffCANARY PID 4711 19450608\x01".lower()] == []
