import time

import numpy as np
import pytest

from echoflow.audit import AuditFailedError, Neighbours, decide_samples
from tests.audit.synthetic import near_copies


def test_planted_copies_withheld_and_fresh_released(cohort: dict) -> None:
    rng = np.random.default_rng(5)
    tau = cohort["calibration"].thresholds("global")
    exact = cohort["train"]["a"][rng.choice(len(cohort["train"]["a"]), 20, replace=False)]
    noisy, src = near_copies(cohort["train"]["b"], 20, noise=0.005, rng=rng)
    generated = np.concatenate([exact, noisy, cohort["fresh"]])
    result = decide_samples(generated, cohort["indexes"], tau)
    assert not result.release[:40].any()  # every copy withheld
    assert (result.site[:20] == "a").all() and (result.site[20:40] == "b").all()
    np.testing.assert_array_equal(result.real_id[20:40], src)
    assert result.release[40:].mean() > 0.85  # fresh patients: mostly released (τ is the p95 of new patients)
    assert result.exact[~result.release].all()
    assert set(result.released_ids()) == set(np.flatnonzero(result.release))


def test_site_thresholds_are_used_per_site(cohort: dict) -> None:
    result = decide_samples(cohort["fresh"], cohort["indexes"], {"a": 2.0, "b": -2.0})
    assert not result.release.any() and (result.site == "b").all()


class _Broken:
    def search(self, queries: np.ndarray, *, k: int, threshold: float | None) -> Neighbours:
        raise RuntimeError("disk gone")


class _Slow:
    def search(self, queries: np.ndarray, *, k: int, threshold: float | None) -> Neighbours:
        time.sleep(2.0)
        raise AssertionError("unreachable within the audit's deadline")


@pytest.mark.parametrize("bad", [_Broken(), _Slow()])
def test_a_failing_site_fails_the_audit_closed(cohort: dict, bad: object) -> None:
    sites = dict(cohort["indexes"]) | {"c": bad}
    result = decide_samples(cohort["fresh"], sites, 0.99, timeout_s=0.5)
    assert result.failed and list(result.failures) == ["c"]
    assert not result.release.any()
    with pytest.raises(AuditFailedError, match="c"):
        result.released_ids()


def test_calibration_is_the_heldout_percentile(cohort: dict) -> None:
    cal = cohort["calibration"]
    own = cohort["indexes"]["a"].search(cohort["heldout"]["a"], k=1).similarity[:, 0]
    assert cal.site_threshold["a"] == pytest.approx(np.percentile(own, 95))
    assert cal.global_threshold >= min(cal.site_threshold.values())
    assert len(cal.heldout_to_all) == sum(len(h) for h in cohort["heldout"].values())
