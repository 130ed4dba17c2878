"""The bounded IVF's inverted lists: list-sorted storage and each list's geometry (ball radius, angular shells).

A list's members are sorted by their angle α to the list's unit centre ĉ, outermost first, and cut into `SHELLS`
shells of (nearly) equal count; shell h spans α ∈ [α_lo, α_hi]. For a unit query q at angle φ from ĉ the triangle
inequality on the sphere gives ∠(q, x) ≥ |φ − α_x|, so a shell can hold a member with ⟨q, x⟩ ≥ τ only if
α_lo − β ≤ φ ≤ α_hi + β, β = arccos τ. The outermost shell's α_hi is the list's cone angle θ; the shells let a
probed list skip its inner members for a far query and its outer members for a near one.

Angles come from chords, α = 2·asin(‖x − ĉ‖ / 2), never from arccos of a cosine, which loses tight lists (members
within ~1e-4 rad of ĉ) to rounding: a float32 member of norm 1 + 3e-8 has a cosine that rounds to 1, so θ came out
0 and over-τ pairs just beyond the list's edge were skipped. Differences are taken in float32 (exact for near
vectors), squares summed in float64, and `CHORD_MARGIN` widens every shell for the rounding of the operands.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# shells per list: with `echoflow.audit.index.LIST_SIZE` 768, shells of 64 (measured there)
SHELLS = 12
# float32 rounding of a prepared member (norm 1 ± 1e-7), of the unit centre and of the difference: < 1e-6 of chord
CHORD_MARGIN = 1e-6


@dataclass(frozen=True)
class Lists:
    """Inverted lists stored list after list (list i holds rows ``offsets[i]:offsets[i + 1]``).

    Attributes:
        centroids: (L, D) float32, each list's centre (its member mean).
        offsets: (L + 1,) int64 row offsets.
        ids: (N,) int64 local sample id of each stored row.
        vectors: (N, D) float32 prepared unit vectors, list-sorted, each list outermost member first.
        radius: (L,) float64 ball radius ≥ max ‖x − c‖ (0 for an empty list).
        shells: (L, SHELLS, 2) float64 [α_lo, α_hi] of each shell, rad ([inf, -inf] for an empty shell).
    """

    centroids: np.ndarray
    offsets: np.ndarray
    ids: np.ndarray
    vectors: np.ndarray
    radius: np.ndarray
    shells: np.ndarray


def shell_offsets(offsets: np.ndarray) -> np.ndarray:
    """(L, SHELLS + 1) int64 row offsets of every list's shells, from the lists' ``offsets`` (L + 1,)."""
    sizes = np.diff(offsets)
    return offsets[:-1, None] + (np.arange(SHELLS + 1) * sizes[:, None]) // SHELLS


def measure_lists(vectors: np.ndarray, ids: np.ndarray, centroids: np.ndarray, assign: np.ndarray,
                  chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort rows into lists, outermost member first, and measure each list (see the module docstring).

    Args:
        vectors: (N, D) float32 prepared unit vectors; reordered in place.
        ids: (N,) int64 sample ids of the rows; reordered in place with them.
        centroids: (L, D) float32 list centres.
        assign: (N,) int64 list of each row, 0..L-1.
        chunk: rows per step (bounds the temporaries).

    Returns:
        (offsets (L + 1,) int64, radius (L,) float64, shells (L, SHELLS, 2) float64), as in `Lists`.
    """
    n_lists = len(centroids)
    sizes = np.bincount(assign, minlength=n_lists)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    radius, shells = np.zeros(n_lists), np.empty((n_lists, SHELLS, 2))
    shells[..., 0], shells[..., 1] = np.inf, -np.inf
    if len(vectors) == 0:
        return offsets, radius, shells
    norms = np.maximum(np.sqrt(np.einsum("ij,ij->i", centroids, centroids, dtype=np.float64)), 1e-12)
    unit = (centroids / norms[:, None]).astype(np.float32)
    dist, chord = np.empty(len(vectors)), np.empty(len(vectors))
    for lo in range(0, len(vectors), chunk):
        x, rows = vectors[lo : lo + chunk], assign[lo : lo + chunk]
        for centre, out in ((centroids, dist), (unit, chord)):
            diff = x - np.take(centre, rows, axis=0)
            out[lo : lo + chunk] = np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float64))
    order = np.lexsort((-chord, assign))
    vectors[:] = np.take(vectors, order, axis=0)  # np.take: ~2.5x numpy's fancy indexing on short rows
    ids[:] = np.take(ids, order)
    dist, chord = np.take(dist, order), np.take(chord, order)
    full = sizes > 0
    radius[full] = np.maximum.reduceat(dist, offsets[:-1][full]) + CHORD_MARGIN
    bounds = shell_offsets(offsets)
    filled = bounds[:, 1:] > bounds[:, :-1]
    outer, inner = bounds[:, :-1][filled], bounds[:, 1:][filled] - 1
    shells[..., 1][filled] = 2.0 * np.arcsin(np.minimum((chord[outer] + CHORD_MARGIN) / 2.0, 1.0))
    shells[..., 0][filled] = 2.0 * np.arcsin(np.clip((chord[inner] - CHORD_MARGIN) / 2.0, 0.0, 1.0))
    return offsets, radius, shells
