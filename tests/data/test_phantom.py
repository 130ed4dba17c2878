"""The phantom A4C cohort: layout, determinism, exact area–length EF, pixels that follow EF, splits, site styles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.path import Path as PolygonPath
from typer.testing import CliRunner

from echoflow.cli import app
from echoflow.data.echonet import FILELIST_COLUMNS, read_avi, read_cohort
from echoflow.data.phantom import (
    FPS,
    area_length_volume,
    generate_cohort,
    render_video,
    sample_visit,
    write_site,
)
from echoflow.data.phantom_anatomy import cardiac_cycle, sample_anatomy
from echoflow.data.phantom_look import sample_site_style
from echoflow.errors import EchoFlowError

SITES, PATIENTS, SEED = 3, 10, 0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate_cohort(tmp_path_factory.mktemp("phantom"), sites=SITES, patients_per_site=PATIENTS, seed=SEED)


def videos(folder: Path) -> list[tuple[pd.Series, np.ndarray, np.ndarray, dict[int, np.ndarray]]]:
    """Every FileList row with its decoded pixels, LV masks and {frame: tracing (21, 4)}."""
    tracings = pd.read_csv(folder / "VolumeTracings.csv")
    out = []
    for _, row in pd.read_csv(folder / "FileList.csv").iterrows():
        rows = tracings[tracings.FileName == f"{row.FileName}.avi"]
        traced = {int(f): rows[rows.Frame == f][["X1", "Y1", "X2", "Y2"]].to_numpy() for f in rows.Frame.unique()}
        out.append((row, read_avi(folder / "Videos" / f"{row.FileName}.avi"),
                    np.load(folder / "LVMasks" / f"{row.FileName}.npz")["mask"], traced))
    return out


def test_cohort_is_written_in_the_echonet_layout_and_reads_back(cohort: list[Path]) -> None:
    assert [f.name for f in cohort] == ["site_00", "site_01", "site_02"]
    for folder in cohort:
        table = pd.read_csv(folder / "FileList.csv")
        assert list(table.columns) == [*FILELIST_COLUMNS, "PatientID", "Site"]
        records = read_cohort(folder)
        assert records.problems == [] and len(records.records) == len(table)
        assert {(r.height, r.width, r.num_frames, r.fps, r.site) for r in records.records} == {
            (64, 64, 32, FPS, folder.name)}
        for _, frames, mask, traced in videos(folder)[:3]:
            assert frames.shape == mask.shape == (32, 64, 64) and frames.dtype == np.uint8 and mask.dtype == bool
            assert len(traced) == 2 and all(t.shape == (21, 4) for t in traced.values())


def test_same_seed_gives_identical_bytes_and_pixels_other_seed_differs(cohort: list[Path], tmp_path: Path) -> None:
    again = write_site(tmp_path / "again", site=1, patients=PATIENTS, seed=SEED)  # alone, out of order
    for name in ("FileList.csv", "VolumeTracings.csv"):
        assert (again / name).read_bytes() == (cohort[1] / name).read_bytes()
    for (_, frames, mask, _), (_, frames2, mask2, _) in zip(videos(cohort[1]), videos(again), strict=True):
        np.testing.assert_array_equal(frames, frames2)
        np.testing.assert_array_equal(mask, mask2)
    other = write_site(tmp_path / "other", site=1, patients=2, seed=SEED + 1)
    first, changed = videos(cohort[1])[0], videos(other)[0]
    assert first[0].FileName == changed[0].FileName and first[0].EF != changed[0].EF
    assert np.abs(first[1].astype(int) - changed[1].astype(int)).mean() > 5


def test_later_patients_are_new_patients_of_the_same_site(cohort: list[Path], tmp_path: Path) -> None:
    """A test cohort numbered after the cohort's patients: none of them is in it; patient k is the same either way."""
    test = write_site(tmp_path / "test", site=1, patients=3, seed=SEED, first_patient=PATIENTS, split="TEST")
    table, base = pd.read_csv(test / "FileList.csv"), pd.read_csv(cohort[1] / "FileList.csv")
    assert set(table.Split) == {"TEST"}
    assert sorted(table.PatientID.unique()) == [f"S01P{k:04d}" for k in range(PATIENTS, PATIENTS + 3)]
    assert not set(table.FileName) & set(base.FileName)
    shifted = write_site(tmp_path / "shifted", site=1, patients=2, seed=SEED, first_patient=PATIENTS - 2)
    ours = pd.read_csv(shifted / "FileList.csv")  # the cohort's last two patients, rendered alone
    mine = base[base.PatientID.isin(ours.PatientID)]
    assert ours.FileName.tolist() == mine.FileName.tolist() and ours.EF.tolist() == mine.EF.tolist()
    for name in ours.FileName[:2]:
        np.testing.assert_array_equal(read_avi(shifted / "Videos" / f"{name}.avi"),
                                      read_avi(cohort[1] / "Videos" / f"{name}.avi"))


def test_ef_from_the_stored_tracings_and_masks_matches_filelist(cohort: list[Path]) -> None:
    raster_errors = []
    for folder in cohort:
        for row, _, mask, traced in videos(folder):
            es, ed = traced  # EchoNet order: the small (ES) trace first, the large (ED) last
            edv, esv = area_length_volume(traced[ed]), area_length_volume(traced[es])
            assert abs(100.0 * (edv - esv) / edv - row.EF) < 1e-6  # far inside the 1-point acceptance
            assert abs(row.EDV / row.ESV - edv / esv) < 1e-6 and 15.0 - 1e-6 <= row.EF <= 80.0 + 1e-6
            rows, cols = np.mgrid[: mask.shape[1], : mask.shape[2]]
            centres = np.stack([cols.ravel(), rows.ravel()], axis=1)
            for frame, tracing in traced.items():  # the mask is exactly the traced polygon at pixel centres
                polygon = np.concatenate([tracing[1:, :2], tracing[:0:-1, 2:]])
                inside = PolygonPath(polygon).contains_points(centres).reshape(mask.shape[1:])
                np.testing.assert_array_equal(inside, mask[frame])
            axis = {f: np.hypot(*(t[0, 2:] - t[0, :2])) for f, t in traced.items()}
            raster = {f: 8.0 * mask[f].sum() ** 2 / (3.0 * np.pi * axis[f]) for f in traced}
            raster_errors.append(100.0 * (1.0 - raster[es] / raster[ed]) - row.EF)
            assert mask[ed].sum() > mask[es].sum()
            assert np.nonzero(mask[ed])[1].mean() > 31.5  # the LV is on the viewer's right
    # 64x64 pixel areas: measured mean 0.7, max 2.3 EF points for seed 0.
    assert np.mean(np.abs(raster_errors)) < 1.5 and np.max(np.abs(raster_errors)) < 4.0


def test_dark_lv_area_in_the_pixels_shrinks_with_ef(cohort: list[Path]) -> None:
    efs, drops = [], []
    for folder in cohort:
        for row, frames, mask, traced in videos(folder):
            es, ed = traced
            region = mask[ed]  # the ED cavity; count dark pixels in it, from the pixels alone
            dark = 0.3 * np.percentile(frames[frames > 0], 90)
            dark_ed, dark_es = (frames[ed][region] < dark).sum(), (frames[es][region] < dark).sum()
            efs.append(row.EF)
            drops.append(1.0 - dark_es / dark_ed)
    assert np.corrcoef(efs, drops)[0, 1] > 0.8  # measured 0.96


def test_splits_are_by_patient_and_every_patient_has_visits_with_different_ef(cohort: list[Path]) -> None:
    tables = [pd.read_csv(folder / "FileList.csv") for folder in cohort]
    everyone = pd.concat(tables)
    assert everyone.PatientID.nunique() == SITES * PATIENTS and everyone.FileName.is_unique
    for table in tables:
        assert (table.groupby("PatientID").Split.nunique() == 1).all()
        per_split = table.groupby("Split").PatientID.nunique()
        assert dict(per_split) == {"TRAIN": 7, "VAL": 1, "TEST": 2}
        visits = table.groupby("PatientID").EF
        assert (visits.size() >= 2).all() and (visits.nunique() == visits.size()).all()
        assert (visits.max() - visits.min()).mean() > 3.0
    assert 45.0 < everyone.EF.mean() < 65.0 and everyone.EF.std() > 7.0


def test_sites_differ_in_style_more_than_videos_within_a_site(cohort: list[Path]) -> None:
    features = []
    for folder in cohort:
        for _, frames, _, _ in videos(folder):
            fan = frames[frames > 0].astype(float)
            features.append((folder.name, fan.mean(), fan.std() / fan.mean()))
    table = pd.DataFrame(features, columns=["site", "brightness", "speckle_contrast"])
    for column in ("brightness", "speckle_contrast"):
        groups = table.groupby("site")[column]
        between = (groups.size() * (groups.mean() - table[column].mean()) ** 2).sum() / (SITES - 1)
        within = (groups.var(ddof=1) * (groups.size() - 1)).sum() / (len(table) - SITES)
        assert between / within > 10.0, column  # one-way ANOVA F


def test_render_video_in_memory_for_a_fresh_patient_has_its_target_ef() -> None:
    rng = np.random.default_rng(2024)  # an "audit canary": a patient from no cohort
    anatomy, style = sample_anatomy(rng), sample_site_style(rng)
    for target in (25.0, 70.0):
        visit = sample_visit(rng, patient_ef=target, frames=20)
        video = render_video(anatomy, visit, style, size=48, frames=20, rng=rng)
        assert video.frames.shape == video.lv_mask.shape == (20, 48, 48)
        assert video.es_frame - video.ed_frame == visit.systole_frames and video.es_frame < 20
        assert abs(video.ef - visit.ef) < 1e-6  # the motion model's area–length EF is exact
        assert video.edv > video.esv > 0.0 and 60.0 < video.edv < 220.0  # adult mL


def test_cardiac_cycle_hits_ed_and_es_exactly_and_fits_one_beat_in_32_frames() -> None:
    for heart_rate in (50.0, 110.0):
        contraction, opening = cardiac_cycle(heart_rate=heart_rate, ed_frame=3, systole_frames=7, frames=32,
                                             fps=FPS)
        assert contraction[3] == 0.0 and contraction[10] == 1.0 and contraction.min() >= 0.0
        assert np.all(opening[3:10] == 0.0) and opening.max() > 0.9  # AV valves shut in systole only
        assert 60.0 * FPS / heart_rate <= 31  # a whole beat fits in 32 frames at 25 fps


def test_bad_requests_fail_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(EchoFlowError, match="sites"):
        generate_cohort(tmp_path, sites=0, patients_per_site=2, seed=0)
    with pytest.raises(EchoFlowError, match="frames"):
        generate_cohort(tmp_path, sites=1, patients_per_site=1, seed=0, frames=6)


def test_cli_phantom_writes_sites_and_prints_a_summary(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", "phantom", "--sites", "2", "--patients-per-site", "2", "--out",
                                      str(tmp_path), "--size", "32", "--frames", "16", "--seed", "5"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "site_00" in result.output and "site_01" in result.output and "TRAIN EF" in result.output
    assert read_avi(next((tmp_path / "site_01" / "Videos").glob("*.avi"))).shape == (16, 32, 32)
