"""An inverted-file index whose threshold decision is exact: probe every list shell that could hold a match.

The lists live in a low-dimensional bound space (`echoflow.audit.projection`): each prepared real vector x maps
to a unit z(x) ∈ R^(m+1) with ⟨q, x⟩ ≤ ⟨z(q), z(x)⟩, so every bound below, taken on the z's, bounds the real
inner product too. For a list with centroid c and members z (unit vectors), and a unit query z(q):

- ball bound: ⟨q, x⟩ ≤ ⟨z(q), c⟩ + r, with r = max ‖z − c‖ over the list;
- shell bound: if a shell's members lie at angles α ∈ [α_lo, α_hi] from ĉ = c/‖c‖ and z(q) at angle φ from ĉ,
  then ∠(z(q), z) ≥ max(0, φ − α_hi, α_lo − φ) (`echoflow.audit.lists`); the outermost shell's α_hi is the list's
  cone angle θ, which alone gives the cone bound cos(max(0, φ − θ)).

Both bounds are tests on ⟨z(q), c⟩, one pair of thresholds per shell, so the probe costs one centroid GEMM. Per
query, the members of every shell whose bounds (plus a float32 safety margin) reach τ pass through the pair
bound ⟨z(q), z(x)⟩ ≥ τ (stacked small GEMMs, `echoflow.audit.scan`), and the few that pass get their exact
inner product; in the ``nprobe`` lists of the best ball bound, the member of the best projected product
⟨Vᵀq, Vᵀx⟩ gets its exact inner product too, for an approximate nearest neighbour below τ. So no real sample
over τ is missed, while a high τ skips most lists, most shells of the lists it probes and nearly every pair of
the shells it scans. A returned maximum is exact whenever it is at least every list's ball bound; otherwise it
is a lower bound (an exact inner product with one member). Without a threshold the search is exact: the
``nprobe`` lists are scanned whole, then every list whose bound reaches a query's k-th best.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

from echoflow.audit.lists import SHELLS, Lists, measure_lists, shell_offsets
from echoflow.audit.neighbours import CPU_SLOTS, Neighbours, Similarity, SiteIndex, normalise, prepare
from echoflow.audit.projection import PROJECTED_DIMS, principal_basis, project
from echoflow.audit.scan import batches, pairs_over, top_k
from echoflow.errors import EchoFlowError
from echoflow.progress import progress_bar

# float32 inner products of unit vectors in D ≤ 4096 err by < 1e-6; probing a list needlessly only costs time.
BOUND_MARGIN = 1e-5
QUERY_CHUNK = 8192
# queries per search chunk: ≥ 2**27 / (nlist · SHELLS), so each probed shell is read about once per 10k queries
# (its pairs, at worst (nlist · SHELLS · chunk), are what the chunk holds)
CHUNK_ENTRIES = 2**27
# centroid products per step of the probe: a (lists, Q) float32 block that stays in cache (1 MiB)
PROBE_ENTRIES = 2**18


class BoundedIVFIndex(SiteIndex):
    """Inverted lists of a site's real embeddings, bounded in a low-dimensional space; exact at the threshold.

    The lists are stored list after list twice: the prepared vectors (exact products) and their bound-space
    z's (`echoflow.audit.projection`), which carry the lists' geometry. On disk they are a
    ``faiss.IndexIVFFlat`` (inner product) of the prepared vectors plus the basis in the sidecar.
    """

    kind = "bounded_ivf"

    def __init__(self, ivf: faiss.IndexIVF, *, similarity: Similarity, nprobe: int, basis: np.ndarray | None,
                 lists: Lists, vectors: np.ndarray, prepared: bool) -> None:
        """Wrap measured lists.

        Args:
            ivf: the faiss index the lists are saved as (its lists may be empty until `save`).
            similarity: ``cosine`` or ``pearson``.
            nprobe: lists of the best ball bound always searched, for an approximate neighbour below τ.
            basis: (D, m) bound-space basis, or None when the lists are bounded on the vectors themselves.
            lists: the lists of the z's (centroids, shells, radii in the bound space).
            vectors: (N, D) the real embeddings, row i = local id i; kept by reference (not copied: the search
                prepares the few rows it compares exactly), so they must not change while the index is used.
            prepared: True when ``vectors`` are prepared already (float32 unit rows).
        """
        self.similarity = similarity
        self.nprobe = nprobe
        self._ivf, self._basis = ivf, basis
        self._centroids = lists.centroids
        self._centroid_norms = np.maximum(np.linalg.norm(self._centroids.astype(np.float64), axis=1), 1e-12)
        self._offsets, self._sorted_ids, self._z = lists.offsets, lists.ids, lists.vectors
        self._raw, self._prepared = vectors, prepared
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
        dims: int = PROJECTED_DIMS,
        seed: int = 0,
    ) -> BoundedIVFIndex:
        """Index (N, D) raw real embeddings with faiss's k-means lists; local id i = row i.

        Args:
            vectors: (N, D) raw real embeddings.
            similarity: ``cosine`` or ``pearson``.
            nlist: inverted lists; default ``N // 64`` (at least 1). Smaller lists mean tighter radii.
            nprobe: lists of the best ball bound always probed, for an approximate neighbour below τ.
            train_per_list: k-means training sample per list (a subsample of the data, 10 iterations).
            dims: bound-space dimensions (`echoflow.audit.projection.principal_basis`).
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
            index = cls._from_faiss(ivf, similarity=similarity, nprobe=nprobe,
                                    basis=principal_basis(x, similarity="cosine", dims=dims, seed=seed))
            advance(1)
        return index

    @classmethod
    def from_saved(cls, raw: faiss.Index, meta: dict[str, Any]) -> BoundedIVFIndex:
        """Rebuild from a read faiss index and its sidecar (radii are recomputed and checked against it)."""
        if not isinstance(raw, faiss.IndexIVFFlat):
            raise EchoFlowError(f"bounded IVF index file: expected an IndexIVFFlat, got {type(raw).__name__}")
        basis = None if meta.get("basis") is None else np.array(meta["basis"], dtype=np.float64)
        index = cls._from_faiss(raw, similarity=meta["similarity"], nprobe=int(meta["nprobe"]), basis=basis)
        if not np.allclose(index._radius, np.array(meta["radius"], dtype=np.float64), atol=1e-5):
            raise EchoFlowError("bounded IVF sidecar: list radii do not match the index file")
        return index

    @classmethod
    def _from_faiss(cls, ivf: faiss.IndexIVF, *, similarity: Similarity, nprobe: int,
                    basis: np.ndarray | None) -> BoundedIVFIndex:
        """Read ``ivf``'s filled lists, map them to the bound space and measure them (centres: member means)."""
        if ivf.invlists is None:  # checked before the sizes are read (`_copy_lists` reads the lists)
            raise EchoFlowError("bounded IVF: the faiss index has no inverted lists")
        sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
        ids, x = _copy_lists(ivf, sizes)
        x_by_id = np.empty_like(x)
        x_by_id[ids] = x
        z = project(x, basis)  # x itself without a basis: measured (sorted within lists) in place
        starts = np.concatenate([[0], np.cumsum(sizes)])[:-1]
        centroids = np.zeros((ivf.nlist, z.shape[1]), dtype=np.float32)
        full = sizes > 0
        centroids[full] = np.add.reduceat(z, starts[full], dtype=np.float64) / sizes[full, None]
        rows = np.arange(len(x))
        offsets, radius, shells = measure_lists(z, rows, centroids, np.repeat(np.arange(ivf.nlist), sizes))
        ids = ids[rows]
        lists = Lists(centroids=centroids, offsets=offsets, ids=ids, vectors=z, radius=radius, shells=shells)
        return cls(ivf, similarity=similarity, nprobe=nprobe, basis=basis, lists=lists, vectors=x_by_id,
                   prepared=True)

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

    def bounds(self, qc: np.ndarray, *, lists: slice = slice(None)) -> np.ndarray:
        """(L, Q) float64 upper bounds on ⟨q, x⟩ over the members of ``lists`` (default all).

        ``qc = centroids[lists] @ q.T``.
        """
        qc = qc.astype(np.float64)
        norms = self._centroid_norms[lists, None]
        theta = self._theta[lists]
        cos_theta, sin_theta = np.cos(theta)[:, None], np.sin(theta)[:, None]
        cos_phi = np.clip(qc / norms, -1.0, 1.0)
        cone = cos_phi * cos_theta + np.sqrt(1.0 - cos_phi**2) * sin_theta
        bound = np.minimum(qc + self._radius[lists, None], np.where(cos_phi >= cos_theta, 1.0, cone)) + BOUND_MARGIN
        return np.where(self._sizes[lists, None] > 0, bound, -np.inf)

    def search(self, queries: np.ndarray, *, k: int = 1, threshold: float | None = None) -> Neighbours:
        """See `SiteIndex.search`; ``threshold=None`` runs a second pass at each query's first-pass k-th best."""
        q = self._check_queries(queries, k)
        parts = []
        step = max(QUERY_CHUNK // 2, CHUNK_ENTRIES // max(self.nlist * SHELLS, 1))
        with CPU_SLOTS, progress_bar(f"search bounded IVF index ({len(q)} queries)", total=len(q)) as advance:
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
        qz = project(chunk, self._basis)
        if threshold is None:  # first pass: the nprobe lists; then every list whose bound reaches its k-th best
            lists, rows = self._probe(qz)[2:4]
            first = self._exact(chunk, lists, rows, k=k, shells=False)
            kth = self._merge(*first[:3], queries=len(chunk), k=k)[0][:, k - 1]
            shells, rows = self._probe(qz, kth=kth)[:2]
            parts = [first, self._exact(chunk, shells, rows, k=k, shells=True)]
            exact = np.ones(len(chunk), dtype=bool)
        else:
            shells, rows, lists, near, ceiling = self._probe(qz, limits=self._shell_limits(threshold))
            parts = [self._estimated(chunk, qz, lists, near, k=k),
                     self._survivors(chunk, qz, shells, rows, threshold, k=k)]
        pair_rows, pair_sim, pair_pos, compared = (np.concatenate(x) for x in zip(*parts, strict=True))
        sim, ids = self._merge(pair_rows, pair_sim, pair_pos, queries=len(chunk), k=k)
        if threshold is not None:
            exact = sim[:, k - 1] >= ceiling
        return sim, ids, exact, int(compared.sum())

    def _probe(self, qz: np.ndarray, *, limits: tuple[np.ndarray, np.ndarray] | None = None,
               kth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Shells to scan, the nearest lists, and per query the best ball bound of any list.

        Every query searches its ``nprobe`` lists of the best ball bound, and scans other shells: with
        ``limits`` (`_shell_limits`), those whose limits hold its centroid product; with ``kth`` (Q,), every shell
        of the lists whose `bounds` reach its value; with neither, none. Works in list tiles whose (lists, Q)
        centroid products stay in cache; a list-level test first, then the shells of the lists that pass it,
        taken shell by shell, so each shell's pairs come out adjacent without a sort.

        Returns:
            (shells (P,) flat shell index i·SHELLS + h, rows (P,) query, the pairs of one shell adjacent; lists
            (R,), their rows (R,), sorted by list; ceiling (Q,) float32).
        """
        n = len(qz)
        filled = (self._shell_size > 0).reshape(self.nlist, SHELLS)
        if limits is not None:
            edges_by_list = np.concatenate(limits, axis=1)  # (nlist, 2·SHELLS): lower edges, then upper
            reach = limits[0].min(axis=1)  # a list's loosest shell; inf for an empty list
        nprobe = min(self.nprobe, self.nlist)
        ceiling = np.full(n, -np.inf, dtype=np.float32)
        near = np.zeros((nprobe, n), dtype=np.int64)  # the nprobe best lists so far, and their ball bounds
        near_ball = np.full((nprobe, n), -np.inf, dtype=np.float32)
        found: list[tuple[np.ndarray, np.ndarray]] = []
        step = max(1, PROBE_ENTRIES // max(n, 1))
        for lo in range(0, self.nlist, step):  # list-major (lists, Q) tiles: reductions run down columns
            hi = min(lo + step, self.nlist)
            qc = self._centroids[lo:hi] @ qz.T
            ball = qc + self._radius32[lo:hi, None]  # ⟨q, c⟩ + r ≥ ⟨q, x⟩; -inf for an empty list
            top = ball.max(axis=0)
            np.maximum(ceiling, top, out=ceiling)
            if nprobe == 1:  # argmax only where this tile beats the best so far (a few tiles per query)
                better = np.flatnonzero(top > near_ball[0])
                near[0, better], near_ball[0, better] = ball[:, better].argmax(axis=0) + lo, top[better]
            elif nprobe > 1:
                pool_ball = np.concatenate([near_ball, ball])
                pool = np.concatenate([near, np.broadcast_to(np.arange(lo, hi)[:, None], ball.shape)])
                pick = np.argpartition(-pool_ball, nprobe - 1, axis=0)[:nprobe]
                near, near_ball = np.take_along_axis(pool, pick, axis=0), np.take_along_axis(pool_ball, pick, axis=0)
            if limits is not None:
                reached = qc >= reach[lo:hi, None]
            elif kth is not None:
                reached = self.bounds(qc, lists=slice(lo, hi)) >= kth
            else:
                continue
            flat = np.flatnonzero(reached)
            listed, row = np.divmod(flat, n)
            listed += lo
            if limits is not None:  # np.take: ~10x numpy's fancy indexing for these small rows
                value = np.take(qc.ravel(), flat)[:, None]
                edges = np.take(edges_by_list, listed, axis=0)
                hit = (value >= edges[:, :SHELLS]) & (value <= edges[:, SHELLS:])
            else:
                hit = np.take(filled, listed, axis=0)
            shell, pair = np.divmod(np.flatnonzero(hit.T), len(row))  # shell-major: a shell's pairs adjacent
            shell += np.take(listed, pair) * SHELLS
            found.append((shell.astype(np.int32), np.take(row, pair).astype(np.int32)))
        shells, rows = (np.concatenate(x) for x in zip(*found, strict=True)) if found else (np.zeros(0, np.int32),) * 2
        if nprobe and (kth is not None or self._basis is None):  # the nearest lists are scanned whole, exactly
            keep = ((shells // SHELLS)[None, :] != near[:, rows]).all(axis=0)
            shells, rows = shells[keep], rows[keep]
        lists, by = near.T.ravel(), np.repeat(np.arange(n), nprobe)
        keep = self._sizes[lists] > 0
        order = np.argsort(lists[keep], kind="stable")
        return shells, rows, lists[keep][order].astype(np.int32), by[keep][order].astype(np.int32), ceiling

    def _exact(self, q: np.ndarray, blocks: np.ndarray, rows: np.ndarray, *, k: int,
               shells: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Exact top-k of each (block, query) pair, blocks being shells or whole lists, sorted by block.

        Returns (rows (P,), similarity (P, k), list-sorted positions (P, k), members compared (P,)).
        """
        start, size = (self._shell_start, self._shell_size) if shells else (self._offsets[:-1], self._sizes)
        parts = [top_k(batch, k) for batch in batches(q, self._members, blocks=blocks, rows=rows, start=start,
                                                        size=size)]
        if not parts:
            return _no_pairs(k)
        r, sim, pos = (np.concatenate(x) for x in zip(*parts, strict=True))
        return r, sim, pos, size[blocks]

    def _estimated(self, q: np.ndarray, qz: np.ndarray, lists: np.ndarray, rows: np.ndarray, *,
                   k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per (list, query) pair, the exact products of the k members of the best projected products ⟨Vᵀq, Vᵀx⟩.

        The residuals' product, unknown, is ~0 on average: the projected product ranks members by their likely
        inner product at 25 numbers a pair, and the k chosen get exact ones (lower bounds of the list's top-k).
        Without a basis, the lists are scanned exactly (`_exact`). Returns as `_exact`.
        """
        if self._basis is None:
            return self._exact(q, lists, rows, k=k, shells=False)
        estimate = qz.copy()
        estimate[:, -1] = 0.0
        parts = [top_k(batch, k) for batch in batches(estimate, self._bound_rows, blocks=lists, rows=rows,
                                                        start=self._offsets[:-1], size=self._sizes)]
        if not parts:
            return _no_pairs(k)
        r, guess, pos = (np.concatenate(x) for x in zip(*parts, strict=True))
        sim = np.full(guess.shape, -np.inf, dtype=np.float32)
        real = np.isfinite(guess)  # -inf: a list with fewer than k members
        left = np.take(q, np.repeat(r, k)[real.ravel()], axis=0)
        sim[real] = np.einsum("ij,ij->i", left, self._members(pos[real]))
        order = np.argsort(-sim, axis=1, kind="stable")  # descending, as `_merge` expects of each pair's row
        return r, np.take_along_axis(sim, order, axis=1), np.take_along_axis(pos, order, axis=1), self._sizes[lists]

    def _survivors(self, q: np.ndarray, qz: np.ndarray, shells: np.ndarray, rows: np.ndarray, threshold: float, *,
                   k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pairs of the scanned shells whose bound-space product reaches τ, with their exact products.

        Returns (rows (H,), similarity (H, k): the exact product then -inf, positions (H, k), (P,) shell sizes).
        """
        cut = np.float32(threshold - BOUND_MARGIN)
        found = [pairs_over(batch, cut) for batch in batches(qz, self._bound_rows, blocks=shells, rows=rows,
                                                              start=self._shell_start, size=self._shell_size)]
        if not found:
            return _no_pairs(k)
        r, pos = (np.concatenate(x) for x in zip(*found, strict=True))
        by_row = np.argsort(pos, kind="stable")  # the real rows gathered in storage order
        r, pos = r[by_row], pos[by_row]
        sim = np.full((len(r), k), -np.inf, dtype=np.float32)
        sim[:, 0] = np.einsum("ij,ij->i", np.take(q, r, axis=0), self._members(pos))
        return r, sim, np.repeat(pos[:, None], k, axis=1), self._shell_size[shells]

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
        found = np.isfinite(flat_sim)
        query, flat_sim, flat_pos = query[found], flat_sim[found], flat_pos[found]
        # a member both estimated near and passed by the filter counts once (the same exact product)
        once = np.unique(query * max(self.ntotal, 1) + flat_pos, return_index=True)[1]
        query, flat_sim, flat_pos = query[once], flat_sim[once], flat_pos[once]
        order = np.lexsort((-flat_sim, query))
        query, flat_sim, flat_pos = query[order], flat_sim[order], flat_pos[order]
        rank = np.arange(len(query)) - np.searchsorted(query, query)
        keep = (rank < k) & np.isfinite(flat_sim)
        sim[query[keep], rank[keep]] = flat_sim[keep]
        ids[query[keep], rank[keep]] = self._sorted_ids[flat_pos[keep]]
        return sim, ids

    def _members(self, at: np.ndarray) -> np.ndarray:
        """(..., D) float32 prepared vectors of the members at list-sorted positions ``at`` (any shape)."""
        rows = np.take(self._raw, np.take(self._sorted_ids, at.ravel()), axis=0)  # a copy
        if not self._prepared:  # the raw rows passed `prepare`'s checks when the index was built
            rows = rows.astype(np.float32, copy=False)
            normalise(rows, similarity=self.similarity)
        return rows.reshape(*at.shape, self.dim)

    def _bound_rows(self, at: np.ndarray) -> np.ndarray:
        """(..., m+1) float32 bound-space z's of the members at list-sorted positions ``at`` (any shape)."""
        return np.take(self._z, at, axis=0)  # np.take: ~2.5x numpy's fancy indexing for these short rows

    def vectors(self) -> np.ndarray:  # noqa: D102
        return self._raw if self._prepared else prepare(self._raw, similarity=self.similarity, what="real embeddings")

    def _write(self, path: Path) -> dict[str, Any]:
        if self._ivf.ntotal != self.ntotal:  # built from sorted lists (see __init__): fill faiss's lists now
            x = self._members(np.arange(self.ntotal))
            if self._ivf.quantizer.ntotal == 0:  # faiss's centres live in the vectors' space: the member means
                full = self._sizes > 0
                means = np.zeros((self.nlist, self.dim), dtype=np.float32)
                means[full] = np.add.reduceat(x, self._offsets[:-1][full], dtype=np.float64) / self._sizes[
                    full, None]
                self._ivf.quantizer.add(means)
                self._ivf.is_trained = True
            assign = np.repeat(np.arange(self.nlist, dtype=np.int64), self._sizes)
            self._ivf.add_core(self.ntotal, faiss.swig_ptr(x), faiss.swig_ptr(self._sorted_ids),
                               faiss.swig_ptr(assign))
        faiss.write_index(self._ivf, str(path))
        basis = None if self._basis is None else self._basis.tolist()
        return {"nlist": self.nlist, "nprobe": self.nprobe, "radius": self._radius.tolist(), "basis": basis}


def _copy_lists(ivf: faiss.IndexIVF, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Members of all of ``ivf``'s lists, list after list: (ids (N,), vectors (N, D) float32) for lists of ``sizes``.

    An owned contiguous copy: BLAS on views into faiss's list storage ran ~10× slower here.
    """
    lists, d, n = ivf.invlists, int(ivf.d), int(sizes.sum())
    if lists is None:
        raise EchoFlowError("bounded IVF: the faiss index has no inverted lists")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    ids = np.empty(n, dtype=np.int64)
    vectors = np.empty((n, d), dtype=np.float32)
    for i in np.flatnonzero(sizes):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        ids[lo:hi] = faiss.rev_swig_ptr(lists.get_ids(int(i)), hi - lo)
        codes = faiss.rev_swig_ptr(lists.get_codes(int(i)), (hi - lo) * d * 4)
        vectors[lo:hi] = codes.view(np.float32).reshape(-1, d)
    return ids, vectors


def _no_pairs(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    empty = np.zeros(0, dtype=np.int64)
    return empty, np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64), empty
