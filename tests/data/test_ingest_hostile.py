"""A hostile DICOM folder, built with pydicom at test time: every bad input is skipped with one PHI-free line.

Each hostile input sits next to good files in a folder named after the patient, and carries canary PHI in its
header and often its name. After ``echoflow data ingest``: every good file is ingested, each bad one gives exactly
one ``input #N: <reason>`` line naming no path and no value from the file, no traceback is printed, and no canary
byte is in any output file, output file name, the log or the CLI output. Bombs are each read in a forked process
whose peak memory and time are measured.
"""

from __future__ import annotations

import os
import resource
import struct
import time
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage
from typer.testing import CliRunner

from echoflow.cli import app
from echoflow.data.dicom import pseudonym, read_ultrasound
from echoflow.data.dicom_pixels import UnusableDicom
from echoflow.errors import EchoFlowError
from tests.data.test_dicom import CANARIES, scan, write_us

SALT = "a-site-secret-of-32-characters!!"
PATIENT_DIR = "CANARY^PHI_4711"
GIB = 2**30


def uid(i: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.{i}"


def dicom_edit(path: Path, **tags: object) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def jpeg_frame(size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = BytesIO()
    Image.fromarray(np.zeros(size, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def jpeg_bomb(path: Path) -> Path:
    """Rows/Columns 96x128, but each ~300-byte JPEG frame declares 20000x20000 in its own SOF header."""
    frame = bytearray(jpeg_frame())
    sof = frame.find(b"\xff\xc0")
    struct.pack_into(">HH", frame, sof + 5, 20000, 20000)
    ds = pydicom.dcmread(write_us(path, scan(4), jpeg=True, instance=uid(900)))
    ds.PixelData = encapsulate([bytes(frame)] * 4)
    ds.save_as(path)
    return path


def deflate_bomb(path: Path, inflated: int = 400 * 2**20) -> Path:
    """A Deflated Explicit VR file of about 400 KB whose dataset inflates to 400 MiB (a PixelData of zeros)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = uid(901)
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = UltrasoundMultiFrameImageStorage, uid(901), "US"
    ds.PatientName = CANARIES["PatientName"]
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 4096, 4096, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames, ds.FrameTime = 64, "40.0"
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [squeeze.compress(body.getvalue() + b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", inflated))]
    zeros = bytes(2**24)
    for _ in range(inflated // len(zeros)):
        chunks.append(squeeze.compress(zeros))
    chunks.append(squeeze.compress(bytes(inflated % len(zeros))) + squeeze.flush())
    file_meta = DicomBytesIO()
    file_meta.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(file_meta, meta)
    path.write_bytes(file_meta.getvalue() + b"".join(chunks))
    return path


def pixel_data_twice(path: Path) -> Path:
    """A native PixelData twice as long as Rows x Columns x NumberOfFrames declare."""
    ds = pydicom.dcmread(write_us(path, scan(), instance=uid(902)))
    ds.PixelData = ds.PixelData * 2
    ds.save_as(path)
    return path


def extra_fragments(path: Path) -> Path:
    """An encapsulated PixelData with more frames than NumberOfFrames."""
    ds = pydicom.dcmread(write_us(path, scan(4), jpeg=True, instance=uid(903)))
    ds.PixelData = encapsulate([jpeg_frame((96, 128))] * 8)
    ds.save_as(path)
    return path


def truncated_header(path: Path) -> Path:
    data = write_us(path, scan(), instance=uid(904)).read_bytes()
    path.write_bytes(data[:400])  # cut inside SOPInstanceUID, before Modality
    return path


def nested(root: Path, depth: int) -> Path:
    """``depth`` nested folders under ``root`` (built one level at a time: no recursion); returns the deepest."""
    folder = root
    for _ in range(depth):
        folder = folder / "d"
        os.mkdir(folder)
    return folder


def remove_nested(root: Path, depth: int) -> None:
    """shutil.rmtree recurses per level: remove the chain from the bottom up instead."""
    folders = [root / "/".join(["d"] * level) for level in range(1, depth + 1)]
    for folder in reversed(folders):
        for child in folder.iterdir():
            if not child.is_dir():
                child.unlink()
        folder.rmdir()


def hostile_folder(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """Three good files and one of each hostile case; returns (folder, EF table, input name -> expected words)."""
    src = tmp_path / "in" / PATIENT_DIR
    src.mkdir(parents=True)
    write_us(src / "a_good.dcm", scan(), instance=uid(1))
    write_us(src / "b_good.dcm", scan(seed=2), instance=uid(2), PatientID="CANARY-OTHER-PATIENT")
    os.mkdir(src / "c_study")
    write_us(src / "c_study" / "good.dcm", scan(seed=3), instance=uid(3))
    expected = {}

    def case(name: str, words: str) -> Path:
        expected[name] = words
        return src / name

    (case("d_loop_a", "link loop")).symlink_to(src / "d_loop_b")
    (case("d_loop_b", "link loop")).symlink_to(src / "d_loop_a")
    (case("e_self_loop", "not a regular file")).symlink_to(src)  # a link to a folder is not followed
    name = os.fsdecode(b"f_CANARY\xff\xfe.dcm")  # not UTF-8, and no SOPInstanceUID: the name keys the video
    dicom_edit(write_us(src / name, scan(seed=4), instance=uid(5)), SOPInstanceUID=None)
    dicom_edit(write_us(case("g_fast.dcm", "frame rate outside 1-1000 fps"), scan(), instance=uid(6)),
               FrameTime="1e-9")
    dicom_edit(write_us(case("h_slow.dcm", "frame rate outside 1-1000 fps"), scan(), instance=uid(7)),
               FrameTime="1e6")
    truncated_header(case("i_truncated.dcm", "truncated file"))
    write_us(case("j_modality.dcm", "modality not US (no DICOM modality code)"), scan(), instance=uid(8),
             modality="CANARYMOD")
    dicom_edit(write_us(case("k_photometric.dcm", "photometric interpretation not supported"), scan(),
                        instance=uid(9)), PhotometricInterpretation="CANARYPI")
    jpeg_bomb(case("l_jpeg_bomb.dcm", "compressed frame size does not match Rows/Columns"))
    pixel_data_twice(case("m_long_pixels.dcm", "pixel data length does not match the header"))
    extra_fragments(case("n_extra_frames.dcm", "frames in the pixel data do not match NumberOfFrames"))
    write_us(case(".o_hidden.dcm", "hidden file, not read"), scan(seed=8), instance=uid(10))
    os.mkdir(case(".p_hidden_dir", "hidden folder, not searched"))
    write_us(src / ".p_hidden_dir" / "x.dcm", scan(seed=9), instance=uid(11))
    os.mkdir(src / "q_deep")
    deepest = nested(src / "q_deep", 1100)
    expected["q_deep" + "/d" * 31] = "folder nested deeper than 32 levels, not searched"  # at depth 33
    write_us(deepest / "deep.dcm", scan(seed=10), instance=uid(12))
    ef_csv = tmp_path / "ef.csv"
    pd.DataFrame({"SOPInstanceUID": [uid(1), uid(2), uid(3), uid(99)],
                  "EF": ["55.5", "CANARY^PHI", "nan", "inf"]}).to_csv(ef_csv, index=False)
    return src.parent, ef_csv, expected


def input_names(root: Path) -> list[str]:
    """Every input in the order ingest numbers them: the top-level entries of each searched folder, sorted by
    their path relative to ``root`` as bytes (folders not listed; hidden folders and too-deep ones are)."""
    names: list[bytes] = []
    for folder, dirs, files in os.walk(os.fsencode(root), followlinks=False):
        rel = os.path.relpath(folder, os.fsencode(root))
        depth = 0 if rel == b"." else rel.count(b"/") + 1
        for d in list(dirs):
            full = os.path.join(folder, d)
            if d.startswith(b".") or depth + 1 > 32 or os.path.islink(full):
                names.append(os.path.relpath(full, os.fsencode(root)))
                if not os.path.islink(full):
                    dirs.remove(d)
        names += [os.path.relpath(os.path.join(folder, f), os.fsencode(root)) for f in files]
    return [os.fsdecode(n) for n in sorted(names)]


def test_each_hostile_input_is_skipped_with_one_phi_free_line(tmp_path: Path) -> None:
    src, ef_csv, expected = hostile_folder(tmp_path)
    out = tmp_path / "site"
    try:
        result = CliRunner().invoke(app, ["data", "ingest", str(src), "--out", str(out), "--ef-csv", str(ef_csv),
                                          "--size", "16", "--salt", SALT])
        names = input_names(src)
    finally:
        remove_nested(src / PATIENT_DIR / "q_deep", 1100)
    assert result.exit_code == 0, result.output
    assert result.exception is None and "Traceback" not in result.output
    lines = result.output.splitlines()
    skipped = {line.split(":", 1)[0]: line.split(": ", 1)[1] for line in lines if line.startswith("input #")}
    for name, words in expected.items():
        number = names.index(f"{PATIENT_DIR}/{name}") + 1
        assert skipped.pop(f"input #{number}").startswith(words), name
    assert skipped == {}  # the four good files (one with a non-UTF-8 name) were not skipped
    assert [line for line in lines if line.startswith("ef-csv")] == [
        "ef-csv line 3: EF is not a number, row skipped", "ef-csv line 4: EF is not a number, row skipped",
        "ef-csv line 5: EF is not a number, row skipped"]
    assert lines[-1].startswith(f"ingested 4 clips (1 with EF); skipped {len(expected)}")
    table = pd.read_csv(out / "FileList.csv")
    assert len(table) == 4 and table.EF.notna().sum() == 1 and (table.NumberOfFrames == 12).all()
    assert (table.FileName.str.len() == 32).all()  # 128-bit HMAC pseudonyms
    assert sorted(p.name for p in out.rglob("*")) == sorted(
        ["FileList.csv", "ingest_log.txt", "Videos", *(f"{n}.avi" for n in table.FileName)])  # no temp file left
    log = (out / "ingest_log.txt").read_text()
    assert log.splitlines() == [line for line in lines if line.startswith(("input #", "ef-csv"))] + [lines[-1]]
    leaks = [p.name for p in out.rglob("*") if b"canary" in p.name.lower().encode() + (
        p.read_bytes().lower() if p.is_file() else b"")]
    assert leaks == [] and "canary" not in result.output.lower() and PATIENT_DIR not in result.output
    assert "4711" not in result.output and "1.2.826" not in result.output


def test_a_crash_while_writing_leaves_the_old_filelist_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """The FileList is replaced atomically: a failure mid-ingest keeps the last complete one."""
    import echoflow.data.ingest as ingest

    src = tmp_path / "in"
    src.mkdir()
    write_us(src / "a.dcm", scan(), instance=uid(1))
    first = ingest.ingest_dicom(src, tmp_path / "site", salt=SALT, size=16)
    before = (tmp_path / "site" / "FileList.csv").read_bytes()
    write_us(src / "b.dcm", scan(seed=2), instance=uid(2))

    def half_written(root: Path, records: object) -> Path:
        (root / "FileList.csv").write_text("FileName,EF\n")
        raise OSError("disk full")

    monkeypatch.setattr(ingest, "write_filelist", half_written)
    with pytest.raises(EchoFlowError, match=r"cannot write FileList\.csv"):
        ingest.ingest_dicom(src, tmp_path / "site", salt=SALT, size=16)
    assert len(first.records) == 1 and (tmp_path / "site" / "FileList.csv").read_bytes() == before


@pytest.mark.parametrize("salt", ["", "short-salt", "15-bytes-secret"])
def test_short_or_empty_salts_are_refused_in_one_line(tmp_path: Path, salt: str) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write_us(src / "a.dcm", scan(), instance=uid(1))
    result = CliRunner().invoke(app, ["data", "ingest", str(src), "--out", str(tmp_path / "site"), "--salt", salt])
    assert result.exit_code == 1 and result.exception is not None
    assert isinstance(result.exception, EchoFlowError)
    assert str(result.exception) == "--salt must be at least 16 bytes (128 bits) of secret"
    assert salt not in str(result.exception) or not salt
    assert not (tmp_path / "site").exists()


def test_no_salt_takes_a_random_key_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ECHOFLOW_SALT", raising=False)
    src = tmp_path / "in"
    src.mkdir()
    write_us(src / "a.dcm", scan(), instance=uid(1))
    names = []
    for run in range(2):
        result = CliRunner().invoke(app, ["data", "ingest", str(src), "--out", str(tmp_path / f"site{run}")])
        assert result.exit_code == 0, result.output
        assert result.output.startswith("warning: no --salt given")
        names.append(pd.read_csv(tmp_path / f"site{run}" / "FileList.csv").FileName[0])
    assert names[0] != names[1]


def test_pseudonyms_are_hmac_sha256_under_the_salt() -> None:
    import hashlib
    import hmac

    expected = hmac.new(SALT.encode(), b"patient:CANARY-ID-4711", hashlib.sha256).hexdigest()[:32]
    assert pseudonym(SALT, "patient:CANARY-ID-4711") == expected
    assert pseudonym(SALT, "patient:CANARY-ID-4711") != pseudonym(SALT + "x", "patient:CANARY-ID-4711")
    with pytest.raises(EchoFlowError, match="at least 16 bytes"):
        pseudonym("", "patient:x")


def test_an_old_style_site_folder_is_not_mixed_with_new_pseudonyms(tmp_path: Path) -> None:
    """A folder written with the old sha256(salt + ID)[:16] names would link no patient to the new ones."""
    src = tmp_path / "in"
    src.mkdir()
    write_us(src / "a.dcm", scan(), instance=uid(1))
    site = tmp_path / "site"
    (site / "Videos").mkdir(parents=True)
    (site / "FileList.csv").write_text("FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split,"
                                       "PatientID,Site\n0123456789abcdef,,,,16,16,25.0,12,TRAIN,fedcba9876543210,"
                                       "site\n")
    (site / "Videos" / "0123456789abcdef.avi").write_bytes(b"x")
    result = CliRunner().invoke(app, ["data", "ingest", str(src), "--out", str(site), "--salt", SALT])
    assert result.exit_code == 1
    assert "older ingest" in str(result.exception)


def half_still() -> np.ndarray:
    """The most pixels allowed (192 x 1024 x 1024), moving noise with every other 8x8 block still: half the
    sector is found as overlay and filled, the most work a file can ask of the text removal."""
    pixels = np.random.default_rng(0).integers(0, 256, (192, 1024, 1024), dtype=np.uint8)
    rows, columns = np.mgrid[0:1024, 0:1024]
    still = (rows // 8 + columns // 8) % 2 == 0
    pixels[:, still] = pixels[0, still]
    return pixels


def fork_read(path: Path, root: Path) -> tuple[str, float, int]:
    """``read_ultrasound`` in a forked child: (outcome line, seconds, peak resident bytes of the child)."""
    reader, writer = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child: never returns to pytest
        os.close(reader)
        try:
            clip = read_ultrasound(path, root=root)
            message = f"ok {clip.frames.shape}"
        except UnusableDicom as err:
            message = f"refused: {err.reason}"
        except BaseException as err:  # reported to the parent, which fails the test
            message = f"crashed: {type(err).__name__}"
        os.write(writer, message.encode())
        os._exit(0)
    os.close(writer)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    with os.fdopen(reader, "rb") as pipe:
        message = pipe.read().decode()
    assert os.WIFEXITED(status), f"child killed by signal {os.WTERMSIG(status)}"
    return message, seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def test_bombs_are_refused_in_bounded_memory_and_time(tmp_path: Path) -> None:
    """Each bomb in its own process: refused, peak memory < 1 GiB, < 30 s (the biggest allowed file too)."""
    src = tmp_path / "in"
    src.mkdir()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cases = {
        "deflate": (deflate_bomb(src / "deflate.dcm"), "refused: Deflated data inflates past"),
        "jpeg": (jpeg_bomb(src / "jpeg.dcm"), "refused: compressed frame size does not match Rows/Columns"),
        "long": (pixel_data_twice(src / "long.dcm"), "refused: pixel data length does not match the header"),
        "largest allowed, half of it overlay": (write_us(src / "big.dcm", half_still(), instance=uid(950)),
                                                "ok (192, "),
    }
    for name, (path, outcome) in cases.items():
        message, seconds, peak = fork_read(path, src)
        print(f"{name}: {message}; {seconds:.1f} s, peak {peak / 2**20:.0f} MiB (pytest itself {baseline / 2**20:.0f})")
        assert message.startswith(outcome), name
        assert seconds < 30 and peak < GIB, name
