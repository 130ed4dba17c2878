import math
import sys
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest

from echoflow.cli import main
from echoflow.data.echonet import (
    VideoRecord,
    load_video,
    read_avi,
    read_cohort,
    write_avi,
    write_filelist,
)
from echoflow.errors import EchoFlowError


def video_pixels(video: int, frames: int = 32, size: int = 64) -> np.ndarray:
    """Pixel (0, 0) holds the frame number x 4, pixel (0, 1) the video number x 8: readable after decoding."""
    pixels = np.full((frames, size, size), 60, dtype=np.uint8)
    pixels[:, 0, 0] = np.arange(frames) * 4
    pixels[:, 0, 1] = video * 8
    return pixels


def make_site(root: Path, rows: list[dict[str, object]], *, frames: int = 32, size: int = 64,
              first: int = 0) -> Path:
    """A phantom-style site folder: one FFV1 video per row (unless ``"write": False``) + FileList.csv.

    Video ``i`` of the folder is numbered ``first + i`` (see ``video_pixels``).
    """
    for number, row in enumerate(rows, start=first):
        if row.pop("write", True):
            name = str(row["FileName"]).removesuffix(".avi")
            write_avi(root / "Videos" / f"{name}.avi", video_pixels(number, frames, size), fps=25)
    table = pd.DataFrame(rows)
    defaults = {"ESV": 40.0, "EDV": 100.0, "FrameHeight": size, "FrameWidth": size, "FPS": 25,
                "NumberOfFrames": frames, "Split": "TRAIN"}
    for column, value in defaults.items():
        table[column] = table[column].fillna(value) if column in table else value
    (root / "Videos").mkdir(parents=True, exist_ok=True)
    table.to_csv(root / "FileList.csv", index=False)
    return root


def zero_frame_avi(path: Path) -> None:
    with av.open(str(path), mode="w", format="avi") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width = stream.height = 64
        stream.pix_fmt = "gray"
        container.start_encoding()


def test_avi_round_trip_is_lossless(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (5, 16, 24), dtype=np.uint8)
    write_avi(tmp_path / "a.avi", frames, fps=25)
    np.testing.assert_array_equal(read_avi(tmp_path / "a.avi"), frames)


def test_filelist_round_trip(tmp_path: Path) -> None:
    records = [
        VideoRecord(f"v{i}", tmp_path / "Videos" / f"v{i}.avi", ef=30.5 + i / 3, esv=40.25, edv=101.0, fps=25.0,
                    num_frames=32, height=64, width=64, split=("TRAIN", "VAL", "TEST")[i], patient_id=f"p{i // 2}",
                    site="site_00")
        for i in range(3)
    ]
    for record in records:
        write_avi(record.path, video_pixels(0, 2), fps=25)
    write_filelist(tmp_path, records)
    cohort = read_cohort(tmp_path)
    assert cohort.records == records and cohort.problems == []


def test_real_echonet_layout_without_patient_or_site(tmp_path: Path) -> None:
    root = make_site(tmp_path / "EchoNet-Dynamic", [
        {"FileName": "0X1A", "EF": 55.0, "Split": "train"},
        {"FileName": "0X1B.avi", "EF": 61.2, "Split": "Val"},
    ])
    cohort = read_cohort(root)
    assert cohort.problems == []
    assert [(r.file_name, r.patient_id, r.site, r.split) for r in cohort.records] == [
        ("0X1A", "0X1A", "EchoNet-Dynamic", "TRAIN"), ("0X1B", "0X1B", "EchoNet-Dynamic", "VAL")]
    assert cohort.records[1].path == root / "Videos" / "0X1B.avi"


def test_bad_rows_give_one_problem_each_and_good_rows_load(tmp_path: Path) -> None:
    root = make_site(tmp_path / "s", [
        {"FileName": "good1", "EF": 50.0},
        {"FileName": "gone", "EF": 50.0, "write": False},
        {"FileName": "high", "EF": 150.0},
        {"FileName": "blank", "EF": math.nan},
        {"FileName": "split", "EF": 40.0, "Split": "EXTERNAL"},
        {"FileName": "good2", "EF": 0.0},
    ])
    cohort = read_cohort(root)
    assert [r.file_name for r in cohort.records] == ["good1", "good2"]
    assert len(cohort.problems) == 4
    for name, words in [("gone", "missing"), ("high", "EF 150"), ("blank", "EF blank"), ("split", "Split")]:
        [line] = [p for p in cohort.problems if p.startswith(str(root / "Videos" / f"{name}.avi") + ":")]
        assert words in line and "\n" not in line
    lenient = read_cohort(root, require_ef=False)
    assert [r.file_name for r in lenient.records] == ["good1", "blank", "good2"]
    assert math.isnan(lenient.records[1].ef) and len(lenient.problems) == 3


def test_missing_columns_fail_the_folder_naming_them(tmp_path: Path) -> None:
    root = make_site(tmp_path / "s", [{"FileName": "a", "EF": 50.0}])
    pd.read_csv(root / "FileList.csv").drop(columns=["EF", "FPS"]).to_csv(root / "FileList.csv", index=False)
    with pytest.raises(EchoFlowError, match=r"missing columns EF, FPS$"):
        read_cohort(root)


@pytest.mark.parametrize("layout", ["empty", "no_videos", "no_filelist"])
def test_not_a_dataset(tmp_path: Path, layout: str) -> None:
    if layout == "no_videos":
        (tmp_path / "FileList.csv").write_text("FileName,EF\n")
    if layout == "no_filelist":
        (tmp_path / "Videos").mkdir()
    with pytest.raises(EchoFlowError, match="not an EchoNet-style dataset") as err:
        read_cohort(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_load_video_resizes_any_size_with_antialias(tmp_path: Path) -> None:
    stripes = np.zeros((3, 112, 112), dtype=np.uint8)
    stripes[:, :, ::2] = 200  # one-pixel stripes: antialiasing averages them, plain sampling would not
    stripes[1] = 30
    write_avi(tmp_path / "a.avi", stripes, fps=50)
    video = load_video(tmp_path / "a.avi", size=64)
    assert video.shape == (3, 64, 64) and video.dtype == np.uint8
    assert abs(float(video[0].mean()) - 100.0) < 2 and video[0].std() < 25
    assert np.all(video[1] == 30)


def test_corrupt_videos_raise_naming_the_file(tmp_path: Path) -> None:
    write_avi(tmp_path / "good.avi", np.random.default_rng(0).integers(0, 256, (8, 32, 32), dtype=np.uint8), 25)
    data = (tmp_path / "good.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    zero_frame_avi(tmp_path / "zero.avi")
    for name in ("cut.avi", "zero.avi"):
        with pytest.raises(EchoFlowError, match=rf"^{tmp_path / name}: "):
            load_video(tmp_path / name, size=16)


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["echoflow", *args])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_site(tmp_path / "site_00", [{"FileName": "a", "EF": 40.0, "PatientID": "p"},
                                         {"FileName": "b", "EF": 60.0, "PatientID": "p"},
                                         {"FileName": "c", "EF": 50.0, "Split": "TEST"},
                                         {"FileName": "d", "EF": 150.0}])
    b = make_site(tmp_path / "site_01", [{"FileName": "e", "EF": math.nan, "Split": "VAL"}])
    code, out, _ = run_cli(monkeypatch, capsys, "data", "summary", str(a), str(b))
    assert code == 0
    assert "site_00: 3 videos (TRAIN 2 videos/1 patients, VAL 0 videos/0 patients, TEST 1 videos/1 patients)" in out
    assert "EF %: mean 50.0, sd 8.2, min 40.0, max 60.0; unknown 0" in out
    assert "problems: 1" in out and "d.avi: EF 150.0 outside 0-100" in out
    assert "site_01: 1 videos" in out and "EF %: unknown for every video" in out
    code, out, err = run_cli(monkeypatch, capsys, "data", "summary", str(a), str(tmp_path))
    assert code == 1 and err == f"error: {tmp_path}: not an EchoNet-style dataset (needs FileList.csv and Videos/)\n"
