"""Batched scans of (block, query) pairs: many small inner-product blocks in a few stacked GEMMs.

The bounded IVF compares each query with the members of a few thousand small blocks (list shells); one GEMM per
block spends most of its time in Python and numpy call overhead (~7,800 per site on the audit benchmark). Here
the (block, queries) spans are grouped by block size (rounded up to `GRANULE` members) and sorted by query count,
and stacked, so one ``np.matmul`` over a (B, rows, K) x (B, K, width) batch serves B blocks at once, each query
row gathered once per block. Short spans and blocks are padded by repeating their last query or member, so
padding never adds a new pair; callers drop repeats where they matter (top-k).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

# block sizes are rounded up to a multiple of this many members (padding); 8 bools make a word for `_any_last`
GRANULE = 8
# products per stacked batch: 4 MiB of float32, cache-sized
BATCH_PRODUCTS = 2**20


@dataclass(frozen=True)
class Batch:
    """One stacked batch: the product of every query row with every member of its piece.

    Attributes:
        rows: (B, R) query row of each padded row (a repeat of the span's last where ``row_ok`` is False).
        row_ok: (B, R) bool, False on padding rows.
        members: (B, W) row of each member in the store (a repeat of the piece's last where ``member_ok`` is False).
        member_ok: (B, W) bool, False on padding members.
        products: (B, R, W) float32 inner products.
    """

    rows: np.ndarray
    row_ok: np.ndarray
    members: np.ndarray
    member_ok: np.ndarray
    products: np.ndarray


def batches(left: np.ndarray, members: Callable[[np.ndarray], np.ndarray], *, blocks: np.ndarray, rows: np.ndarray,
            start: np.ndarray, size: np.ndarray) -> Iterator[Batch]:
    """Inner products of ``left[rows[p]]`` with every member of block ``blocks[p]``, in stacked batches.

    Args:
        left: (Q, K) float32 queries.
        members: (B, W) store rows -> (B, W, K) float32 member vectors; block b holds store rows
            ``start[b]:start[b] + size[b]``.
        blocks: (P,) block of each pair, sorted (pairs of one block adjacent).
        rows: (P,) query row of each pair.
        start: (nblocks,) first store row of each block.
        size: (nblocks,) members of each block (every scanned block non-empty).
    """
    if len(blocks) == 0:
        return
    cuts = np.flatnonzero(np.diff(blocks)) + 1
    lo, hi = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(blocks)]])
    block = blocks[lo]
    width, count = -(-size[block] // GRANULE) * GRANULE, hi - lo
    order = np.lexsort((-count, width))  # by width, then most rows first
    lo, block, width, count = lo[order], block[order], width[order], count[order]
    i = 0
    while i < len(lo):
        w, r = int(width[i]), int(count[i])  # the most rows in this batch
        end = int(np.searchsorted(width, w, side="right"))  # this width's spans, most rows first
        full = i + int(np.searchsorted(-count[i:end], -(r - max(1, r // 4)), side="right"))  # ≤ 25 % padded rows
        j = min(full, i + max(1, BATCH_PRODUCTS // (r * w)))
        ar, column = np.arange(r), np.arange(w)
        row_ok = ar < count[i:j, None]
        take = rows[lo[i:j, None] + np.minimum(ar, count[i:j, None] - 1)]
        member_ok = column < size[block[i:j], None]
        at = start[block[i:j], None] + np.minimum(column, size[block[i:j], None] - 1)
        right = np.ascontiguousarray(members(at).transpose(0, 2, 1))  # ~1.5x faster than a strided product
        products = np.matmul(np.take(left, take, axis=0), right)  # np.take: ~3x fancy indexing on short rows
        yield Batch(rows=take, row_ok=row_ok, members=at, member_ok=member_ok, products=products)
        i = j


def pairs_over(batch: Batch, threshold: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(query rows (H,), store rows (H,)) of every product ≥ ``threshold`` in ``batch`` (padding repeats dropped)."""
    hit = batch.products >= threshold
    n_rows, width = hit.shape[1:]
    rows = np.flatnonzero(_any_last(hit) & batch.row_ok)  # rows first: hits are rare, a 3-D nonzero is slow
    if len(rows) == 0:
        return rows, rows
    b = rows // n_rows  # np.take on flat indices: ~3x numpy's fancy indexing here
    within, column = np.nonzero(np.take(hit.reshape(-1, width), rows, axis=0) & np.take(batch.member_ok, b, axis=0))
    return (np.take(batch.rows.ravel(), np.take(rows, within)),
            np.take(batch.members.ravel(), np.take(b, within) * width + column))


def top_k(batch: Batch, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each real (row, piece) pair's top-k: (query rows (P,), similarity (P, k) descending, store rows (P, k)).

    -inf / the piece's first member where a piece holds fewer than k members.
    """
    width = batch.products.shape[2]
    rows = np.flatnonzero(batch.row_ok)
    b = rows // batch.row_ok.shape[1]
    products = np.take(batch.products.reshape(-1, width), rows, axis=0)  # (P, W), np.take as in `pairs_over`
    members = np.take(batch.members, b, axis=0)
    if k == 1:  # a padding column repeats its piece's last member, product and all: argmax finds the real one first
        best = products.argmax(axis=1)[:, None]
    else:  # padding masked, or a member would count twice
        products[~np.take(batch.member_ok, b, axis=0)] = -np.inf
        kk = min(k, products.shape[1])
        best = np.argpartition(-products, kk - 1, axis=1)[:, :kk]
        best = np.take_along_axis(best, np.argsort(-np.take_along_axis(products, best, axis=1), axis=1), axis=1)
    sim = np.full((len(rows), k), -np.inf, dtype=np.float32)
    pos = np.repeat(members[:, :1], k, axis=1)
    sim[:, : best.shape[1]] = np.take_along_axis(products, best, axis=1)
    pos[:, : best.shape[1]] = np.take_along_axis(members, best, axis=1)
    return np.take(batch.rows.ravel(), rows), sim, pos


def _any_last(hit: np.ndarray) -> np.ndarray:
    """``hit.any(axis=-1)`` of a C-contiguous bool array, 8 bools a word.

    numpy's own reduction along a short last axis costs ~2 ns an element.
    """
    if hit.shape[-1] % 8:
        return np.asarray(hit.any(axis=-1))
    words = hit.view(np.uint64)
    out = words[..., 0] != 0
    for w in range(1, words.shape[-1]):
        out |= words[..., w] != 0
    return out
