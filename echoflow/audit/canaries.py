"""Canaries and distance-to-closest-record (DCR) statistics: does the audit catch what it must.

Canaries are transformed copies of real *training* frames planted among the generated frames at random positions;
the decision step is not told which. The caller embeds the mixed set like any generated sample, runs `audit`,
then `score` says which canaries were withheld. Canaries are real data: `CanaryPlan.generated_mask` must filter
them out of any release.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from echoflow.data.intensity import TRANSFORMS
from echoflow.errors import EchoFlowError


@dataclass(frozen=True)
class CanaryPlan:
    """Where the canaries went.

    Attributes:
        positions: (N,) int64 indices of canaries in the mixed set.
        source_ids: (N,) int64 rows of the real training frames they copy.
        transforms: (N,) names from `TRANSFORMS`.
        total: size of the mixed set (generated + canaries).
    """

    positions: np.ndarray
    source_ids: np.ndarray
    transforms: tuple[str, ...]
    total: int

    def generated_mask(self) -> np.ndarray:
        """(total,) bool, True for genuinely generated samples (never release the others)."""
        mask = np.ones(self.total, dtype=bool)
        mask[self.positions] = False
        return mask

    def score(self, withheld: np.ndarray) -> dict[str, tuple[int, int]]:
        """Per transform (and ``all``): (caught, planted), from the (total,) bool withheld mask."""
        caught = np.asarray(withheld, dtype=bool)[self.positions]
        names = np.array(self.transforms)
        out = {t: (int(caught[names == t].sum()), int((names == t).sum())) for t in dict.fromkeys(self.transforms)}
        return out | {"all": (int(caught.sum()), len(caught))}


def plant_canaries(
    generated: np.ndarray, real_train: np.ndarray, *, n: int, transforms: tuple[str, ...] = tuple(TRANSFORMS),
    seed: int = 0,
) -> tuple[np.ndarray, CanaryPlan]:
    """Mix ``n`` transformed copies of random real training frames into the generated frames.

    Args:
        generated: (G, 1, H, W) or (G, H, W) generated frames in [-1, 1].
        real_train: (N, ...) real training frames, same per-frame shape.
        n: canaries to plant (``audit.canaries``); transforms cycle through ``transforms``.
        transforms: names from `TRANSFORMS`.
        seed: chooses the sources, the transform parameters and the positions.

    Returns:
        (mixed frames (G + n, ...), plan).
    """
    if generated.shape[1:] != real_train.shape[1:]:
        raise EchoFlowError(f"audit.canaries: frame shapes differ, {generated.shape[1:]} vs {real_train.shape[1:]}")
    if unknown := sorted(set(transforms) - set(TRANSFORMS)):
        raise EchoFlowError(f"audit.canaries: unknown transform(s) {unknown}; known: {sorted(TRANSFORMS)}")
    if not 0 <= n <= len(real_train):
        raise EchoFlowError(f"audit.canaries: expected 0 ≤ n ≤ {len(real_train)} real frames, got {n}")
    rng = np.random.default_rng(seed)
    source = rng.choice(len(real_train), size=n, replace=False)
    names = tuple(transforms[i % len(transforms)] for i in range(n))
    canaries = [TRANSFORMS[t](real_train[s], rng) for s, t in zip(source, names, strict=True)]
    total = len(generated) + n
    positions = np.sort(rng.choice(total, size=n, replace=False))
    mixed = np.empty((total, *generated.shape[1:]), dtype=generated.dtype)
    mask = np.ones(total, dtype=bool)
    mask[positions] = False
    mixed[mask] = generated
    if n:
        mixed[positions] = np.stack(canaries).astype(generated.dtype)
    return mixed, CanaryPlan(positions=positions, source_ids=source.astype(np.int64), transforms=names, total=total)


@dataclass(frozen=True)
class DCRStats:
    """Distance to closest record, as 1 − similarity.

    Attributes:
        share_closer_to_train: share of generated samples closer to the training set than to the held-out set.
        expected_share: that share for a model that never memorises, |train| / (|train| + |held-out|)
            (0.5 for equal sizes); a larger share suggests memorisation.
        dcr_train_quantiles: 5th, 50th, 95th percentile of generated→train DCR.
    """

    share_closer_to_train: float
    expected_share: float
    dcr_train_quantiles: tuple[float, float, float]


def dcr_stats(gen_to_train: np.ndarray, gen_to_heldout: np.ndarray, *, n_train: int, n_heldout: int) -> DCRStats:
    """DCR statistics from each generated sample's max similarity (G,) to the train and the held-out set."""
    if gen_to_train.shape != gen_to_heldout.shape:
        raise EchoFlowError(f"dcr: shapes differ, {gen_to_train.shape} vs {gen_to_heldout.shape}")
    q = np.percentile(1.0 - gen_to_train, [5, 50, 95])
    return DCRStats(
        share_closer_to_train=float(np.mean(gen_to_train > gen_to_heldout)),
        expected_share=n_train / (n_train + n_heldout),
        dcr_train_quantiles=(float(q[0]), float(q[1]), float(q[2])),
    )
