"""Parity protocol pieces: requested EFs for generation, the paired-bootstrap CI of the MAE ratio, seed intervals.

Over regressor seeds (the pipeline's ``pipeline.ef_seeds``, `benchmarks/regressor_seeds.py`): each arm's MAE per
seed with the t interval of their mean (`seed_maes`), and the ratio of two arms from their per-video absolute
errors averaged over seeds with the paired bootstrap over test videos (`seed_averaged_ratio`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

from echoflow.errors import EchoFlowError

EFSource = Literal["histogram", "uniform"]


def draw_efs(train_ef: Sequence[float], n: int, *, source: EFSource, rng: np.random.Generator,
             ef_range: tuple[float, float] = (15.0, 80.0), bin_width: float = 5.0, smooth: float = 5.0,
             noise: float = 0.0) -> np.ndarray:
    """EFs to request from the video flow, percent: from a smoothed histogram of the TRAIN EFs, or uniform.

    ``histogram``: counts of ``train_ef`` in ``bin_width``-point bins over ``ef_range``, plus Laplace noise of
    scale ``noise`` per bin (0 = none; a count changes by at most a patient's visits, so ε = visits / noise),
    clipped at 0, convolved with a Gaussian of ``smooth`` points; EFs are drawn uniformly within a drawn bin,
    so no real EF value is copied into the release. ``uniform``: uniform on ``ef_range``.

    Returns:
        (n,) float64 EFs in ``ef_range``, percent.
    """
    low, high = ef_range
    if source == "uniform":
        return rng.uniform(low, high, n)
    if source != "histogram":
        raise EchoFlowError(f"requested_efs: unknown source {source!r}; choose histogram or uniform")
    edges = np.arange(low, high + bin_width, bin_width)
    counts, _ = np.histogram(np.clip(np.asarray(train_ef, float), low, high - 1e-9), bins=edges)
    counts = counts.astype(float)
    if noise > 0:
        counts = counts + rng.laplace(0.0, noise, counts.shape)
    centres = 0.5 * (edges[1:] + edges[:-1])
    kernel = np.exp(-0.5 * ((centres[:, None] - centres[None]) / smooth) ** 2)
    density = kernel @ np.clip(counts, 0.0, None)
    if density.sum() <= 0:
        raise EchoFlowError("requested_efs: the EF histogram is empty; use source=uniform")
    bins = rng.choice(len(centres), size=n, p=density / density.sum())
    return edges[bins] + rng.uniform(0.0, bin_width, n)


@dataclass(frozen=True)
class Ratio:
    """MAE(a) / MAE(b) on the same test videos, with a paired-bootstrap 95 % interval."""

    ratio: float
    low: float
    high: float
    n: int


def paired_mae_ratio(error_a: np.ndarray, error_b: np.ndarray, *, resamples: int = 2000, seed: int = 0) -> Ratio:
    """MAE(a) / MAE(b) of two regressors' errors on the same test videos, with a paired-bootstrap 95 % interval.

    Each resample draws videos with replacement and takes both regressors' errors on the same draw, so the
    interval reflects which videos are hard once, not twice.
    """
    a, b = np.abs(np.asarray(error_a, float)), np.abs(np.asarray(error_b, float))
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise EchoFlowError(f"paired_mae_ratio: need two equal-length error vectors, got {a.shape}, {b.shape}")
    index = np.random.default_rng(seed).integers(0, len(a), (resamples, len(a)))
    boot = a[index].mean(1) / np.maximum(b[index].mean(1), 1e-12)
    low, high = np.percentile(boot, [2.5, 97.5])
    return Ratio(float(a.mean() / max(b.mean(), 1e-12)), float(low), float(high), len(a))


def seed_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the Student-t 95 % interval of a result over seeds (half-width 0 for one seed)."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


@dataclass(frozen=True)
class SeedMAE:
    """One arm's MAE (EF points) per regressor seed, their mean and its Student-t 95 % half-width."""

    per_seed: tuple[float, ...]
    mean: float
    half: float


def seed_maes(errors: np.ndarray) -> SeedMAE:
    """Each seed's MAE of ``errors`` (seeds, videos; signed or absolute) and their `seed_interval`."""
    e = np.abs(np.asarray(errors, float))
    if e.ndim != 2 or e.shape[1] < 1:
        raise EchoFlowError(f"seed_maes: need (seeds, videos) errors, got {e.shape}")
    maes = e.mean(1)
    mean, half = seed_interval(maes.tolist())
    return SeedMAE(tuple(maes.tolist()), mean, half)


def seed_averaged_ratio(errors_a: np.ndarray, errors_b: np.ndarray, **bootstrap: int) -> Ratio:
    """MAE(a) / MAE(b) from each video's absolute error averaged over seeds, with a paired-bootstrap 95 % interval.

    ``errors_a``, ``errors_b``: (seeds, videos) on the same videos; `paired_mae_ratio` of the seed-averaged
    errors (one seed each: `paired_mae_ratio` itself).
    """
    a, b = (np.abs(np.asarray(e, float)) for e in (errors_a, errors_b))
    if a.ndim != 2 or b.ndim != 2:
        raise EchoFlowError(f"seed_averaged_ratio: need (seeds, videos) errors, got {a.shape}, {b.shape}")
    return paired_mae_ratio(a.mean(0), b.mean(0), **bootstrap)
