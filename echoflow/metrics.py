"""Evaluation metrics: EF regression errors with bootstrap intervals, and the Fréchet distance of embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg

from echoflow.errors import EchoFlowError


@dataclass(frozen=True)
class Regression:
    """EF regression quality on one test set (EF in percent).

    Attributes:
        mae, rmse: EF points. r2: coefficient of determination. n: number of videos.
        mae_ci, rmse_ci, r2_ci: bootstrap 95 % intervals (low, high).
    """

    mae: float
    rmse: float
    r2: float
    n: int
    mae_ci: tuple[float, float]
    rmse_ci: tuple[float, float]
    r2_ci: tuple[float, float]


def _errors(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    residual = pred - truth
    total = float(np.sum((truth - truth.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / total if total > 0 else float("nan")
    return float(np.mean(np.abs(residual))), float(np.sqrt(np.mean(residual**2))), r2


def regression(truth: np.ndarray, pred: np.ndarray, *, bootstrap: int = 1000, seed: int = 0) -> Regression:
    """MAE, RMSE and R² of ``pred`` against ``truth`` (both (N,) EF percent) with percentile-bootstrap 95 % CIs."""
    truth, pred = np.asarray(truth, np.float64), np.asarray(pred, np.float64)
    if truth.shape != pred.shape or truth.ndim != 1 or len(truth) < 2:
        raise EchoFlowError(f"metrics: need two equal (N>=2,) arrays, got {truth.shape} and {pred.shape}")
    rng = np.random.default_rng(seed)
    draws = np.array([_errors(truth[i], pred[i]) for i in rng.integers(0, len(truth), (bootstrap, len(truth)))])
    low, high = np.nanpercentile(draws, 2.5, axis=0), np.nanpercentile(draws, 97.5, axis=0)
    mae, rmse, r2 = _errors(truth, pred)
    return Regression(mae, rmse, r2, len(truth), (low[0], high[0]), (low[1], high[1]), (low[2], high[2]))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to embeddings ``a`` (N, D) and ``b`` (M, D) (as FID does)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise EchoFlowError(f"metrics: need (N, D) and (M, D) embeddings, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.real(linalg.sqrtm(cov_a @ cov_b))  # tiny imaginary parts are numerical noise
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * root))
