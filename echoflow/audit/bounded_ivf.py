"""An inverted-file index whose threshold decision is exact: probe every list shell that could hold a match.

For a list with centroid c and members x (unit vectors, as `prepare` makes them), and a unit query q:

- ball bound: ⟨q, x⟩ = ⟨q, c⟩ + ⟨q, x − c⟩ ≤ ⟨q, c⟩ + r, with r = max ‖x − c‖ over the list;
- shell bound: if a shell's members lie at angles α ∈ [α_lo, α_hi] from ĉ = c/‖c‖ and q at angle φ from ĉ, then
  ∠(q, x) ≥ max(0, φ − α_hi, α_lo − φ) (`echoflow.audit.lists`); the outermost shell's α_hi is the list's cone
  angle θ, which alone gives the cone bound ⟨q, x⟩ ≤ cos(max(0, φ − θ)).

Both bounds are tests on ⟨q, c⟩, one pair of thresholds per shell, so the probe costs one centroid GEMM. Per
query we scan every shell whose bounds (plus a float32 safety margin) reach τ, and all of the ``nprobe`` lists of
the best ball bound for an approximate nearest neighbour. Inner products with scanned members are exact, so no
real sample over τ is missed, while a high τ skips most lists and most shells of the lists it probes. A returned
maximum is exact whenever it is at least every list's ball bound that was not scanned whole; otherwise it is a
lower bound.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from echoflow.audit.lists import SHELLS, Lists, measure_lists, shell_offsets
from echoflow.audit.neighbours import Neighbours, Similarity, SiteIndex, prepare
from echoflow.errors import EchoFlowError
from echoflow.progress import progress_bar

# float32 inner products of unit vectors in D ≤ 4096 err by < 1e-6; probing a list needlessly only costs time.
BOUND_MARGIN = 1e-5
QUERY_CHUNK = 8192
# queries per search chunk: ≥ 2**27 / (nlist · SHELLS), so each probed shell is read about once per 10k queries
# (its pairs, at worst (nlist · SHELLS · chunk), are what the chunk holds)
CHUNK_ENTRIES = 2**27
# queries per step of the probe: an (nlist, tile) float32 block of centroid products that stays in cache
PROBE_TILE = 256


class BoundedIVFIndex(SiteIndex):
    """``faiss.IndexIVFFlat`` (inner product) plus per-list radii; exact at the threshold.

    faiss trains the lists (k-means), assigns and stores the members, and persists them; the search reads the
    lists in place (no copy) and scans them list-major with BLAS.
    """

    kind = "bounded_ivf"

    def __init__(self, ivf: faiss.IndexIVF, *, similarity: Similarity, nprobe: int = 1,
                 lists: Lists | None = None) -> None:
        """Wrap a trained ``ivf``.

        ``lists``: when the builder already holds the measured lists (``ivf``'s quantizer holding
        ``lists.centroids``); ``ivf``'s own lists are then left empty until `save`.
        """
        self.similarity = similarity
        self.nprobe = nprobe
        self._ivf = ivf
        self._centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        self._centroid_norms = np.maximum(np.linalg.norm(self._centroids.astype(np.float64), axis=1), 1e-12)
        if ivf.invlists is None:
            raise EchoFlowError("bounded IVF: the faiss index has no inverted lists")
        self._lists = ivf.invlists
        if lists is None:
            sizes = np.array([self._lists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
            self._sorted_ids, self._sorted = self._copy_lists(sizes)
            self._offsets, self._radius, shells = measure_lists(
                self._sorted, self._sorted_ids, self._centroids, np.repeat(np.arange(ivf.nlist), sizes))
        else:
            self._offsets, self._sorted_ids, self._sorted = lists.offsets, lists.ids, lists.vectors
            self._radius, shells = lists.radius, lists.shells
        self._sizes = np.diff(self._offsets)
        self._shell_lo, self._shell_hi = shells[..., 0], shells[..., 1]
        self._theta = np.where(self._sizes > 0, self._shell_hi.max(axis=1), 0.0)
        bounds = shell_offsets(self._offsets)
        self._shell_start, self._shell_size = bounds[:, :-1].ravel(), np.diff(bounds, axis=1).ravel()
        self._radius32 = np.where(self._sizes > 0, self._radius + BOUND_MARGIN, -np.inf).astype(np.float32)

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        *,
        similarity: Similarity = "cosine",
        nlist: int | None = None,
        nprobe: int = 1,
        train_per_list: int = 16,
        seed: int = 0,
    ) -> BoundedIVFIndex:
        """Index (N, D) raw real embeddings; local id i = row i.

        Args:
            vectors: (N, D) raw real embeddings.
            similarity: ``cosine`` or ``pearson``.
            nlist: inverted lists; default ``N // 64`` (at least 1). Smaller lists mean tighter radii.
            nprobe: lists of the best ball bound always probed, for an approximate neighbour below τ.
            train_per_list: k-means training sample per list (a subsample of the data, 10 iterations).
            seed: k-means seed.
        """
        x = prepare(vectors, similarity=similarity, what="real embeddings")
        n, d = x.shape
        nlist = max(1, min(nlist or n // 64, n))
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter, ivf.cp.seed, ivf.cp.max_points_per_centroid = 10, seed, train_per_list
        ivf.cp.min_points_per_centroid = 1
        # faiss gives no progress inside a phase: the bar counts phases (k-means, assignment, list bounds)
        with progress_bar(f"build bounded IVF ({n} vectors, {nlist} lists)", total=3) as advance:
            ivf.train(x)
            advance(1)
            ivf.add(x)
            advance(1)
            index = cls(ivf, similarity=similarity, nprobe=nprobe)
            advance(1)
        return index

    @classmethod
    def from_saved(cls, raw: faiss.Index, meta: dict[str, Any]) -> BoundedIVFIndex:
        """Rebuild from a read faiss index and its sidecar (radii are recomputed and checked against it)."""
        if not isinstance(raw, faiss.IndexIVFFlat):
            raise EchoFlowError(f"bounded IVF index file: expected an IndexIVFFlat, got {type(raw).__name__}")
        index = cls(raw, similarity=meta["similarity"], nprobe=int(meta["nprobe"]))
        if not np.allclose(index._radius, np.array(meta["radius"], dtype=np.float64), atol=1e-5):
            raise EchoFlowError("bounded IVF sidecar: list radii do not match the index file")
        return index

    @property
    def ntotal(self) -> int:  # noqa: D102
        return len(self._sorted_ids)

    @property
    def dim(self) -> int:  # noqa: D102
        return int(self._ivf.d)

    @property
    def nlist(self) -> int:
        """Number of inverted lists."""
        return int(self._ivf.nlist)

    def _copy_lists(self, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Members of all lists, list after list: (ids (N,), vectors (N, D) float32) for lists of ``sizes``.

        An owned contiguous copy: BLAS on views into faiss's list storage ran ~10× slower here.
        """
        lists, d, n = self._lists, self.dim, int(self._ivf.ntotal)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        ids = np.empty(n, dtype=np.int64)
        vectors = np.empty((n, d), dtype=np.float32)
        for i in np.flatnonzero(sizes):
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            ids[lo:hi] = faiss.rev_swig_ptr(lists.get_ids(int(i)), hi - lo)
            codes = faiss.rev_swig_ptr(lists.get_codes(int(i)), (hi - lo) * d * 4)
            vectors[lo:hi] = codes.view(np.float32).reshape(-1, d)
        return ids, vectors

    def _shell_limits(self, tau: float) -> tuple[np.ndarray, np.ndarray]:
        """((nlist, SHELLS) lower, upper) float32: shell (i, h) can hold ⟨q, x⟩ ≥ τ only if lower ≤ ⟨q, c_i⟩ ≤ upper.

        With β = arccos τ: φ ≤ α_hi + β ⇔ ⟨q, c⟩ ≥ ‖c‖ cos(α_hi + β) (always when α_hi + β ≥ π); φ ≥ α_lo − β ⇔
        ⟨q, c⟩ ≤ ‖c‖ cos(α_lo − β) (always when α_lo ≤ β); and the ball: ⟨q, c⟩ ≥ τ − r. Each widened by the margin.
        """
        beta = np.arccos(np.clip(tau - BOUND_MARGIN, -1.0, 1.0))
        norms = self._centroid_norms[:, None]
        with np.errstate(invalid="ignore"):  # empty shells: α_hi = -inf, α_lo = inf
            outer, inner = self._shell_hi + beta, self._shell_lo - beta
            lower = np.where(outer >= np.pi, -np.inf, norms * np.cos(np.minimum(outer, np.pi)))
            upper = np.where(inner <= 0, np.inf, norms * np.cos(np.clip(inner, 0, np.pi)))
        lower = np.maximum(lower, (tau - self._radius)[:, None]) - BOUND_MARGIN
        empty = ~np.isfinite(self._shell_hi)
        lower[empty], upper[empty] = np.inf, -np.inf
        return lower.astype(np.float32), (upper + BOUND_MARGIN).astype(np.float32)

    def bounds(self, qc: np.ndarray) -> np.ndarray:
        """(nlist, Q) float64 upper bounds on ⟨q, x⟩ over each list's members, from ``qc = centroids @ q.T``."""
        qc = qc.astype(np.float64)
        norms = self._centroid_norms[:, None]
        cos_theta, sin_theta = np.cos(self._theta)[:, None], np.sin(self._theta)[:, None]
        cos_phi = np.clip(qc / norms, -1.0, 1.0)
        cone = cos_phi * cos_theta + np.sqrt(1.0 - cos_phi**2) * sin_theta
        bound = np.minimum(qc + self._radius[:, None], np.where(cos_phi >= cos_theta, 1.0, cone)) + BOUND_MARGIN
        return np.where(self._sizes[:, None] > 0, bound, -np.inf)

    def search(self, queries: np.ndarray, *, k: int = 1, threshold: float | None = None) -> Neighbours:
        """See `SiteIndex.search`; ``threshold=None`` runs a second pass at each query's first-pass k-th best."""
        q = self._check_queries(queries, k)
        parts = []
        step = max(QUERY_CHUNK // 2, CHUNK_ENTRIES // max(self.nlist * SHELLS, 1))
        with progress_bar(f"search bounded IVF index ({len(q)} queries)", total=len(q)) as advance:
            for start in range(0, len(q), step):
                parts.append(self._search_chunk(q[start : start + step], k=k, threshold=threshold))
                advance(len(parts[-1][0]))
        sims, ids, exact, scanned = zip(*parts, strict=True)
        return Neighbours(
            similarity=np.concatenate(sims),
            ids=np.concatenate(ids),
            exact=np.concatenate(exact),
            scanned=sum(scanned) / (len(q) * max(self.ntotal, 1)),
        )

    def _search_chunk(self, chunk: np.ndarray, *, k: int,
                      threshold: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """`search` of prepared queries: ((Q, k) similarity, (Q, k) ids, (Q,) exact, real vectors compared)."""
        if threshold is None:  # first pass: the nprobe lists; then every list whose bound reaches its k-th best
            first = self._scan(chunk, *self._probe(chunk, None)[:2], k=k)[0][:, k - 1]

            def rule(qc: np.ndarray, lo: int) -> np.ndarray:
                return np.repeat(self.bounds(qc)[:, None] >= first[lo : lo + qc.shape[1]], SHELLS, axis=1)
        else:
            lower, upper = (a[:, :, None] for a in self._shell_limits(threshold))

            def rule(qc: np.ndarray, lo: int) -> np.ndarray:
                return (qc[:, None] >= lower) & (qc[:, None] <= upper)

        shells, rows, ceiling = self._probe(chunk, rule)
        sim, idx = self._scan(chunk, shells, rows, k=k)
        exact = np.ones(len(chunk), dtype=bool) if threshold is None else sim[:, k - 1] >= ceiling
        return sim, idx, exact, int(self._shell_size[shells].sum())

    def _probe(self, chunk: np.ndarray, rule: Callable[[np.ndarray, int], np.ndarray] | None,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shell, query) pairs to scan, shell-major, and per query the best ball bound of a list not scanned whole.

        Every query probes all shells of its ``nprobe`` lists of the best ball bound, and the shells for which
        ``rule(qc, lo)`` is True ((nlist, SHELLS, t) from a tile's (nlist, t) centroid products ``qc``, queries
        ``lo:lo + t``). Works in query tiles whose products stay in cache.

        Returns:
            (shells (P,) flat shell index i·SHELLS + h, rows (P,) query, ceiling (Q,) float32).
        """
        filled = (self._shell_size > 0).reshape(self.nlist, SHELLS, 1)
        empty = ~filled
        ceiling = np.empty(len(chunk), dtype=np.float32)
        nprobe = min(self.nprobe, self.nlist)
        shells, rows = [], []
        for lo in range(0, len(chunk), PROBE_TILE):
            qc = self._centroids @ chunk[lo : lo + PROBE_TILE].T
            ball = qc + self._radius32[:, None]  # ⟨q, c⟩ + r ≥ ⟨q, x⟩; -inf for an empty list
            tile = np.zeros((self.nlist, SHELLS, qc.shape[1]), dtype=bool) if rule is None else rule(qc, lo)
            if nprobe == 1:  # the list of the best ball bound (ties: all); argmax along axis 0 is a slow strided pass
                tile |= (ball == ball.max(axis=0))[:, None] & filled
            elif nprobe > 1:
                best = np.zeros(ball.shape, dtype=bool)
                np.put_along_axis(best, np.argpartition(-ball, nprobe - 1, axis=0)[:nprobe], True, axis=0)
                tile |= best[:, None] & filled
            tile &= filled
            np.putmask(ball, (tile | empty).all(axis=1), -np.inf)
            ceiling[lo : lo + PROBE_TILE] = ball.max(axis=0)
            s, r = np.nonzero(tile.reshape(-1, qc.shape[1]))
            shells.append(s.astype(np.int32))
            rows.append((r + lo).astype(np.int32))
        shell, row = np.concatenate(shells), np.concatenate(rows)
        order = np.argsort(shell, kind="stable")  # tiles are sorted runs: a merge
        return shell[order], row[order], ceiling

    def _scan(self, q: np.ndarray, shells: np.ndarray, rows: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of each query over the members of its probed shells: ((Q, k) similarity, (Q, k) ids).

        Pairs (``shells[p]``, ``rows[p]``) sorted by shell. Shell-major: each probed shell is read once and
        multiplied with all its queries (BLAS), which keeps it in cache (a query-major scan, faiss's
        ``search_preassigned``, streams every list once per query). Each pair keeps its top-k; one merge per
        query follows.
        """
        cuts = np.flatnonzero(np.diff(shells)) + 1
        starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(shells)]])
        pair_sim = np.full((len(rows), k), -np.inf, dtype=np.float32)
        pair_pos = np.zeros((len(rows), k), dtype=np.int64)  # row within its shell, then of the list-sorted copy
        first = shells[starts]
        spans = zip(starts.tolist(), ends.tolist(), self._shell_start[first].tolist(), self._shell_size[first].tolist(),
                    strict=True)
        for lo, hi, base, size in spans:
            s = np.take(q, rows[lo:hi], axis=0) @ self._sorted[base : base + size].T
            if k == 1:
                s.max(axis=1, out=pair_sim[lo:hi, 0])
                s.argmax(axis=1, out=pair_pos[lo:hi, 0])
                continue
            top = np.argsort(-s, axis=1)[:, :k] if s.shape[1] <= k else np.argpartition(-s, k - 1, axis=1)[:, :k]
            pair_sim[lo:hi, : top.shape[1]] = np.take_along_axis(s, top, axis=1)
            pair_pos[lo:hi, : top.shape[1]] = top
        pair_pos += self._shell_start[shells][:, None]
        return self._merge(rows, pair_sim, pair_pos, queries=len(q), k=k)

    def _merge(self, rows: np.ndarray, pair_sim: np.ndarray, pair_pos: np.ndarray, *, queries: int,
               k: int) -> tuple[np.ndarray, np.ndarray]:
        """Per query, the top-k of its pairs' candidates (query ``rows[p]`` has ``pair_sim[p]``, (P, k)).

        Returns ((Q, k) similarity descending, -inf where fewer; (Q, k) ids, -1 where none).
        """
        sim = np.full((queries, k), -np.inf, dtype=np.float32)
        ids = np.full((queries, k), -1, dtype=np.int64)
        if k == 1:  # one unbuffered max per query, then the pair that holds it
            np.maximum.at(sim[:, 0], rows, pair_sim[:, 0])
            won = pair_sim[:, 0] == sim[rows, 0]
            ids[rows[won], 0] = self._sorted_ids[pair_pos[won, 0]]
            return sim, ids
        query = np.repeat(rows, k)
        flat_sim, flat_pos = pair_sim.ravel(), pair_pos.ravel()
        order = np.lexsort((-flat_sim, query))
        query, flat_sim, flat_pos = query[order], flat_sim[order], flat_pos[order]
        rank = np.arange(len(query)) - np.searchsorted(query, query)
        keep = (rank < k) & np.isfinite(flat_sim)
        sim[query[keep], rank[keep]] = flat_sim[keep]
        ids[query[keep], rank[keep]] = self._sorted_ids[flat_pos[keep]]
        return sim, ids

    def vectors(self) -> np.ndarray:  # noqa: D102
        out = np.empty_like(self._sorted)
        out[self._sorted_ids] = self._sorted
        return out

    def _write(self, path: Path) -> dict[str, Any]:
        if self._ivf.ntotal != self.ntotal:  # built from sorted lists (see __init__): fill faiss's lists now
            assign = np.repeat(np.arange(self.nlist, dtype=np.int64), self._sizes)
            self._ivf.add_core(self.ntotal, faiss.swig_ptr(self._sorted), faiss.swig_ptr(self._sorted_ids),
                               faiss.swig_ptr(assign))
        faiss.write_index(self._ivf, str(path))
        return {"nlist": self.nlist, "nprobe": self.nprobe, "radius": self._radius.tolist()}
