"""Parity protocol: requested EFs from the TRAIN-EF histogram copy no real value; the paired MAE-ratio CI."""

from __future__ import annotations

import numpy as np
import pytest

from echoflow.errors import EchoFlowError
from echoflow.study.protocol import draw_efs, paired_mae_ratio


def test_histogram_efs_follow_the_train_distribution_without_copying_a_value() -> None:
    rng = np.random.default_rng(0)
    train = np.concatenate([rng.normal(58, 6, 300), rng.uniform(15, 40, 60)]).clip(15, 79.9)
    drawn = draw_efs(train.tolist(), 5000, source="histogram", rng=np.random.default_rng(1))
    assert drawn.min() >= 15 and drawn.max() <= 80
    assert abs(np.median(drawn) - np.median(train)) < 3 and np.mean(drawn < 40) == pytest.approx(
        np.mean(train < 40), abs=0.06)
    assert not set(np.round(drawn, 9)) & set(np.round(train, 9))


def test_uniform_efs_cover_the_range_evenly_and_noise_keeps_them_in_range() -> None:
    drawn = draw_efs([], 6000, source="uniform", rng=np.random.default_rng(2), ef_range=(20, 80))
    assert np.histogram(drawn, bins=6, range=(20, 80))[0] == pytest.approx([1000] * 6, rel=0.15)
    noisy = draw_efs([50.0] * 10, 500, source="histogram", rng=np.random.default_rng(3), noise=5.0)
    assert noisy.min() >= 15 and noisy.max() <= 80
    with pytest.raises(EchoFlowError, match="unknown source"):
        draw_efs([], 1, source="real", rng=np.random.default_rng(0))  # type: ignore[arg-type]


def test_paired_ratio_ci_contains_the_true_ratio_and_pairing_narrows_it() -> None:
    rng = np.random.default_rng(4)
    hard = rng.exponential(4.0, 400)  # per-video difficulty both regressors share
    real, synthetic = hard + rng.normal(0, 0.3, 400), 1.5 * hard + rng.normal(0, 0.3, 400)
    paired = paired_mae_ratio(synthetic, real)
    assert paired.low < 1.5 < paired.high and paired.ratio == pytest.approx(1.5, abs=0.05)
    assert paired.high - paired.low < 0.1  # unpaired resampling of two 400-video MAEs gives ~0.4
    with pytest.raises(EchoFlowError, match="equal-length"):
        paired_mae_ratio(np.ones(3), np.ones(4))
