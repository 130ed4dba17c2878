"""The held-out test cohort parity is tested on: unseen patients of the same sites, generated once; else TEST."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from echoflow.config import load_config
from echoflow.errors import EchoFlowError
from echoflow.study.models import Cohort

SMALL = ["data.sites=2", "data.patients_per_site=4", "data.size=32", "data.frames=16"]


def patients(sites: list) -> set[str]:
    return {record.patient_id for site in sites for record in site.records}


def test_parity_tests_on_unseen_patients_of_the_same_sites(tmp_path: Path) -> None:
    cohort = Cohort.of(load_config([*SMALL, "data.test_patients=3", f"workdir={tmp_path}"]))
    test = cohort.test()
    assert [site.name for site in test] == [site.name for site in cohort.split("TRAIN")] == ["site_00", "site_01"]
    assert {r.split for site in test for r in site.records} == {"TEST"}
    assert len(patients(test)) == 2 * 3 and not patients(test) & patients(cohort.split("TRAIN", "VAL", "TEST"))
    marker = tmp_path / "test_cohort" / "done"
    written = marker.stat().st_mtime_ns
    again = Cohort.of(load_config([*SMALL, "data.test_patients=3", f"workdir={tmp_path}"]))
    assert marker.stat().st_mtime_ns == written  # generated once, then reused
    assert [r.file_name for s in again.test() for r in s.records] == [r.file_name for s in test for r in s.records]


def test_a_run_under_another_seed_tests_on_the_cohort_seeds_test_patients(tmp_path: Path) -> None:
    """A generation draw (``seed=3``) on a workdir whose cohort came from seed 0 gets seed 0's test cohort."""
    Cohort.of(load_config([*SMALL, "seed=0", f"workdir={tmp_path / 'draw'}"]))  # the cohort, no test cohort yet
    draw = Cohort.of(load_config([*SMALL, "seed=3", "data.test_patients=2", f"workdir={tmp_path / 'draw'}"]))
    fresh = Cohort.of(load_config([*SMALL, "seed=0", "data.test_patients=2", f"workdir={tmp_path / 'fresh'}"]))
    other = Cohort.of(load_config([*SMALL, "seed=3", "data.test_patients=2", f"workdir={tmp_path / 'other'}"]))
    first = [site.videos[0] for site in draw.test()]
    assert all(np.array_equal(a, b) for a, b in zip(first, [site.videos[0] for site in fresh.test()], strict=True))
    assert not np.array_equal(first[0], other.test()[0].videos[0])  # the seed does change the phantom's sites


def test_without_a_test_cohort_parity_tests_on_the_sites_test_split(tmp_path: Path) -> None:
    cohort = Cohort.of(load_config([*SMALL, f"workdir={tmp_path}"]))
    assert cohort.test_roots == [] and not (tmp_path / "test_cohort").exists()
    assert [r.file_name for s in cohort.test() for r in s.records] == [
        r.file_name for s in cohort.split("TEST") for r in s.records]


def test_a_test_cohort_of_your_own_data_is_a_clear_error(tmp_path: Path) -> None:
    cfg = load_config(["data.source=echonet", f"data.roots=[{tmp_path}]", "data.test_patients=5",
                       f"workdir={tmp_path}"])
    with pytest.raises(EchoFlowError, match=r"data\.test_patients: 5.*data\.source=phantom"):
        Cohort.of(cfg)
