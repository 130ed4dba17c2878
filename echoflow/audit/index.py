"""Per-site FAISS indexes for the audit: exact brute force for small sites, bounded IVF for large ones.

Measured on clustered patient-like data, HNSW lost true neighbours and SQ8/PQ flipped decisions at the
threshold, so no approximate score decides alone: both indexes here keep the release decision exact.

The bounded IVF's lists come from a two-level k-means (`two_level_lists`) of the rows' 25-d bound-space images
(`echoflow.audit.projection`): ~√L coarse cells, then each cell split into lists of ~768 members. One flat
k-means into L = N / 768 lists costs N·L inner products to assign alone, while two levels cost N·2√L. The
assignment only has to be good, not optimal: each list's radius is measured on its actual members, so the bounds
(and the exact decision) hold for any assignment.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from echoflow.audit.bounded_ivf import QUERY_CHUNK, BoundedIVFIndex
from echoflow.audit.lists import Lists, measure_lists
from echoflow.audit.neighbours import CPU_SLOTS, Neighbours, Similarity, SiteIndex, prepare
from echoflow.audit.projection import PROJECTED_DIMS, bound_space
from echoflow.errors import EchoFlowError
from echoflow.progress import progress_bar
from echoflow.verified import json_object, read_verified

IndexKind = Literal["auto", "exact", "bounded_ivf"]
AUTO_EXACT_BELOW = 50_000
# members per list of the two-level build (`SHELLS` = 12 shells of 64): on the audit benchmark's 4 sites (1M real x
# 10k generated, idle, build + search, median of 5), 768 with 12 shells took 1.27-1.46 s against 1.66-1.86 s for
# 256 with 4 (512/8, 640/10, 768/8, 768/16, 1024/12, 1024/16: 1.50-1.68 s): fewer lists to build and probe, while the
# finer shells keep the pairs to filter about level (4.6 % of pairs vs 4.0 %)
LIST_SIZE = 768


def top1(q: np.ndarray, x: np.ndarray, *, tile: int = 2048,
         advance: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact max inner product of each query with ``x`` and its row: ((Q,) float32, (Q,) int64).

    (tile x tile) float32 GEMM blocks (16 MiB) and an argmax per block: on 2 CPU cores 3x less CPU time than
    faiss ``IndexFlatIP.search(k=1)`` at 250k x 10k (benchmarks/audit.py), same float32 inner products.
    """
    best = np.full(len(q), -np.inf, dtype=np.float32)
    arg = np.full(len(q), -1, dtype=np.int64)
    for lo in range(0, len(q), tile):
        rows = np.arange(min(tile, len(q) - lo))
        for start in range(0, len(x), tile):
            block = q[lo : lo + tile] @ x[start : start + tile].T
            j = block.argmax(axis=1)
            value = block[rows, j]
            better = value > best[lo : lo + tile]
            best[lo : lo + tile][better] = value[better]
            arg[lo : lo + tile][better] = start + j[better]
        if advance is not None:
            advance(len(rows))
    return best, arg


class ExactIndex(SiteIndex):
    """Brute-force inner product (``faiss.IndexFlatIP``); every answer exact. On GPU when faiss has one."""

    kind = "exact"

    def __init__(self, flat: faiss.Index, *, similarity: Similarity) -> None:
        self.similarity = similarity
        self._cpu = flat
        self._search_index = faiss.index_cpu_to_all_gpus(flat) if faiss.get_num_gpus() > 0 else flat
        self._vectors: np.ndarray | None = None

    @classmethod
    def build(cls, vectors: np.ndarray, *, similarity: Similarity = "cosine") -> ExactIndex:
        """Index (N, D) raw real embeddings; local id i = row i."""
        x = prepare(vectors, similarity=similarity, what="real embeddings")
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        index = cls(flat, similarity=similarity)
        index._vectors = x
        return index

    @property
    def ntotal(self) -> int:  # noqa: D102
        return int(self._cpu.ntotal)

    @property
    def dim(self) -> int:  # noqa: D102
        return int(self._cpu.d)

    def search(self, queries: np.ndarray, *, k: int = 1, threshold: float | None = None) -> Neighbours:  # noqa: D102
        q = self._check_queries(queries, k)
        if k == 1 and self._search_index is self._cpu:  # the audit's question, on CPU: tiled GEMM + argmax
            with CPU_SLOTS, progress_bar(f"search exact index ({len(q)} queries)", total=len(q)) as advance:
                sim, idx = top1(q, self.vectors(), advance=advance)
            return Neighbours(similarity=sim[:, None], ids=idx[:, None], exact=np.ones(len(q), dtype=bool),
                              scanned=1.0)
        sims, ids = [], []
        with progress_bar(f"search exact index ({len(q)} queries)", total=len(q)) as advance:
            for start in range(0, len(q), QUERY_CHUNK):  # chunks only to show progress: faiss answers each in full
                sim, idx = self._search_index.search(q[start : start + QUERY_CHUNK], k)
                sims.append(sim)
                ids.append(idx)
                advance(len(sim))
        return Neighbours(similarity=np.concatenate(sims), ids=np.concatenate(ids), exact=np.ones(len(q), dtype=bool),
                          scanned=1.0)

    def vectors(self) -> np.ndarray:  # noqa: D102
        if self._vectors is None:
            self._vectors = self._cpu.reconstruct_n(0, self.ntotal)
        return self._vectors

    def _write(self, path: Path) -> dict[str, Any]:
        faiss.write_index(self._cpu, str(path))
        return {}


def _spherical_kmeans(sample: np.ndarray, k: int, *, rng: np.random.Generator, niter: int) -> np.ndarray:
    """(k, D) float32 unit centroids of unit vectors ``sample`` (M, D): Lloyd, inner-product assignment."""
    centroids = sample[rng.choice(len(sample), k, replace=False)].copy()
    for _ in range(niter):
        sums = _group_sums(sample, (sample @ centroids.T).argmax(axis=1), k)
        norms = np.linalg.norm(sums, axis=1)
        used = norms > 0  # an empty cluster keeps its centroid
        centroids[used] = sums[used] / norms[used, None]
    return centroids


def _group_sums(x: np.ndarray, group: np.ndarray, k: int) -> np.ndarray:
    """(k, D) sum of the rows of ``x`` (N, D) in each group 0..k-1: one one-hot GEMM (numpy's reduceat is slow)."""
    onehot = np.zeros((k, len(x)), dtype=x.dtype)
    onehot[group, np.arange(len(x))] = 1
    return onehot @ x


def _nearest(x: np.ndarray, centroids: np.ndarray, *, chunk: int = 4096) -> np.ndarray:
    """(N,) int64 index of each row's largest inner product with ``centroids`` (one GEMM per chunk)."""
    out = np.empty(len(x), dtype=np.int64)
    for i in range(0, len(x), chunk):
        out[i : i + chunk] = (x[i : i + chunk] @ centroids.T).argmax(axis=1)
    return out


def _member_means(x: np.ndarray, assign: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(means (L', D) of the non-empty groups, (N,) group of each row renumbered 0..L'-1) of rows ``x`` (N, D)."""
    counts = np.bincount(assign, minlength=k)
    used = counts > 0
    means = _group_sums(x, assign, k)[used] / counts[used, None].astype(np.float32)
    return means, (np.cumsum(used) - 1)[assign]


def two_level_lists(vectors: np.ndarray, *, nlist: int, seed: int = 0) -> Lists:
    """Inverted lists of unit vectors by two-level spherical k-means (see the module docstring).

    The coarse cells are found on all rows (`_nearest`); the rows are then copied cell after cell, and each cell
    split, its lists sorted and measured (`measure_lists`) while it is in cache.

    Args:
        vectors: (N, D) float32 unit vectors (prepared rows or their bound-space images); local id i = row i.
        nlist: number of lists wanted (the result has about as many; every list is non-empty).
        seed: sampling and initialisation seed.

    Returns:
        The lists, each centred on its member mean.
    """
    rng = np.random.default_rng(seed)
    n = len(vectors)
    cells = max(1, min(round(np.sqrt(nlist)), n))
    sample = vectors[np.sort(rng.choice(n, min(n, 32 * cells), replace=False))]
    coarse = _nearest(vectors, _spherical_kmeans(sample, cells, rng=rng, niter=8))
    # a stable sort of small integer keys is numpy's radix sort; np.take: ~2.5x fancy indexing on short rows
    order = np.argsort(coarse.astype(np.uint16) if cells <= 2**16 else coarse, kind="stable")
    cuts = np.concatenate([[0], np.cumsum(np.bincount(coarse, minlength=cells))])
    out, ids = np.take(vectors, order, axis=0), order
    centroids, offsets, radius, shells = [], [np.zeros(1, dtype=np.int64)], [], []
    for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
        if lo == hi:
            continue
        sub = out[lo:hi]
        k = max(1, min(round((hi - lo) * nlist / n), hi - lo))
        local = np.zeros(hi - lo, dtype=np.int64)
        if k > 1:
            train = sub[rng.choice(hi - lo, min(hi - lo, 8 * k), replace=False)]
            local = _nearest(sub, _spherical_kmeans(train, k, rng=rng, niter=4))
        means, local = _member_means(sub, local, k)
        starts, r, sh = measure_lists(sub, ids[lo:hi], means, local)
        centroids.append(means)
        offsets.append(lo + starts[1:])
        radius.append(r)
        shells.append(sh)
    return Lists(centroids=np.concatenate(centroids).astype(np.float32), offsets=np.concatenate(offsets), ids=ids,
                 vectors=out, radius=np.concatenate(radius), shells=np.concatenate(shells))


def build_bounded_ivf(vectors: np.ndarray, *, similarity: Similarity = "cosine", nlist: int | None = None,
                      dims: int = PROJECTED_DIMS, seed: int = 0) -> BoundedIVFIndex:
    """A `BoundedIVFIndex` whose lists come from `two_level_lists` of the bound-space z's.

    ``nlist``: default N / 768 (`LIST_SIZE`); ``dims``: see `echoflow.audit.projection.bound_space`.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(vectors) == 0:  # `prepare`'s check, before anything is built
        prepare(vectors, similarity=similarity, what="real embeddings")
    n, d = vectors.shape
    nlist = max(1, min(nlist or n // LIST_SIZE, n))
    with CPU_SLOTS, progress_bar(f"build bounded IVF ({n} vectors)", total=2) as advance:
        basis, z = bound_space(vectors, similarity=similarity, dims=dims, seed=seed)
        lists = two_level_lists(z, nlist=nlist, seed=seed)
        advance(1)
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, len(lists.centroids), faiss.METRIC_INNER_PRODUCT)
        # faiss's own lists (and centres) are filled on save; without a basis the lists' vectors are the prepared
        # rows, kept instead of the raw ones
        index = BoundedIVFIndex(ivf, similarity=similarity, nprobe=1, basis=basis, lists=lists,
                                vectors=vectors if basis is not None else lists.vectors[np.argsort(lists.ids)],
                                prepared=basis is None)
        advance(1)
    return index


def build_index(
    vectors: np.ndarray,
    *,
    kind: IndexKind = "auto",
    similarity: Similarity = "cosine",
    nlist: int | None = None,
    seed: int = 0,
) -> SiteIndex:
    """Build one site's index of its real embeddings.

    Args:
        vectors: (N, D) raw real embeddings; local sample id i = row i.
        kind: ``exact``, ``bounded_ivf``, or ``auto`` (exact below 50,000 vectors, bounded IVF from there).
        similarity: ``cosine`` or ``pearson`` (see `echoflow.audit.neighbours`).
        nlist: IVF lists; default ≈ N / 768 (`LIST_SIZE`; each list is cut into angular shells).
        seed: k-means seed (IVF only).
    """
    if kind not in ("auto", "exact", "bounded_ivf"):
        raise EchoFlowError(f"audit.index: expected auto|exact|bounded_ivf, got {kind!r}")
    n = len(vectors)
    if kind == "exact" or (kind == "auto" and n < AUTO_EXACT_BELOW):
        return ExactIndex.build(vectors, similarity=similarity)
    return build_bounded_ivf(vectors, similarity=similarity, nlist=nlist, seed=seed)


def load_index(path: Path) -> SiteIndex:
    """Read an index written by `SiteIndex.save`: FAISS's own format and a JSON sidecar, no pickle.

    Both are verified against the ``.sha256`` manifest first, so a tampered index cannot hide a patient from the
    audit.
    """
    sidecar = path.with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        raise EchoFlowError(f"{path}: index file or its sidecar {sidecar.name} is missing")
    files = read_verified(path.with_suffix(".sha256"), [path.name, sidecar.name])
    meta = json_object(sidecar, files[sidecar.name])
    try:
        raw = faiss.deserialize_index(np.frombuffer(files[path.name], dtype=np.uint8))
    except RuntimeError as err:  # FAISS's reader throws on a malformed file, with a multi-line C++ message
        raise EchoFlowError(f"{path}: not a FAISS index") from err
    if meta.get("kind") == "exact":
        index: SiteIndex = ExactIndex(raw, similarity=meta["similarity"])
    elif meta.get("kind") == "bounded_ivf":
        index = BoundedIVFIndex.from_saved(raw, meta)
    else:
        raise EchoFlowError(f"{sidecar}: unknown index kind {meta.get('kind')!r}")
    if index.ntotal != meta.get("ntotal") or index.dim != meta.get("dim"):
        raise EchoFlowError(f"{sidecar}: sidecar says {meta.get('ntotal')}×{meta.get('dim')}, "
                            f"index holds {index.ntotal}×{index.dim}")
    return index
