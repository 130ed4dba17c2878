"""An inverted-file index whose threshold decision is exact: probe every list that could hold a match.

For a list with centroid c and members x (unit vectors, as `prepare` makes them), and a unit query q:

- ball bound: ⟨q, x⟩ = ⟨q, c⟩ + ⟨q, x − c⟩ ≤ ⟨q, c⟩ + r, with r = max ‖x − c‖ over the list;
- cone bound: if every member lies within angle θ of ĉ = c/‖c‖ and q at angle φ from ĉ, then
  ⟨q, x⟩ ≤ cos(max(0, φ − θ)), which is tighter on the sphere. θ = max 2·asin(‖x̂ − ĉ‖ / 2) in float64 over the
  renormalised members x̂: arccos of a minimum cosine loses tight lists (members within ~1e-4 rad of ĉ) to
  rounding — a float32 member of norm 1 + 3e-8 has a cosine that rounds to 1, so θ came out 0 and over-τ pairs
  just beyond the list's edge were skipped.

Per query we probe every list whose bound (the smaller of the two, plus a float32 safety margin) reaches τ, and
the ``nprobe`` lists with the nearest centroids for an approximate nearest neighbour. Inner products with the
members of probed lists are exact, so no real sample over τ is missed, while a high τ skips most lists. A
returned maximum is exact whenever it is at least every unprobed list's bound; otherwise it is a lower bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

from echoflow.audit.neighbours import Neighbours, Similarity, SiteIndex, prepare
from echoflow.errors import EchoFlowError
from echoflow.progress import progress_bar

# float32 inner products of unit vectors in D ≤ 4096 err by < 1e-6; probing a list needlessly only costs time.
BOUND_MARGIN = 1e-5
QUERY_CHUNK = 8192


class BoundedIVFIndex(SiteIndex):
    """``faiss.IndexIVFFlat`` (inner product) plus per-list radii; exact at the threshold.

    faiss trains the lists (k-means), assigns and stores the members, and persists them; the search reads the
    lists in place (no copy) and scans them list-major with BLAS.
    """

    kind = "bounded_ivf"

    def __init__(self, ivf: faiss.IndexIVF, *, similarity: Similarity, nprobe: int = 1,
                 lists: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        """Wrap a trained ``ivf``.

        ``lists`` = (offsets, ids, vectors) as `_copy_lists` returns them, when the builder already holds them
        list-sorted: ``ivf``'s own lists are then left empty until `save`.
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
            self._sizes = np.array([self._lists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
            self._offsets, self._sorted_ids, self._sorted = self._copy_lists()
        else:
            self._offsets, self._sorted_ids, self._sorted = lists
            self._sizes = np.diff(self._offsets)
        self._radius, self._theta = self._list_extents()
        self._cos_theta, self._sin_theta = np.cos(self._theta), np.sin(self._theta)
        self._radius32 = (self._radius + BOUND_MARGIN).astype(np.float32)

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
            nprobe: nearest lists always probed, for an approximate neighbour below τ.
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

    def _members(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,), prepared vectors (n, D)) of list ``i``: slices of the list-sorted copy."""
        lo, hi = self._offsets[i], self._offsets[i + 1]
        return self._sorted_ids[lo:hi], self._sorted[lo:hi]

    def _copy_lists(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Members of all lists, list after list: (offsets (nlist+1,), ids (N,), vectors (N, D) float32).

        An owned contiguous copy: BLAS on views into faiss's list storage ran ~10× slower here.
        """
        lists, d, n = self._lists, self.dim, int(self._ivf.ntotal)
        offsets = np.concatenate([[0], np.cumsum(self._sizes)])
        ids = np.empty(n, dtype=np.int64)
        vectors = np.empty((n, d), dtype=np.float32)
        for i in np.flatnonzero(self._sizes):
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            ids[lo:hi] = faiss.rev_swig_ptr(lists.get_ids(int(i)), hi - lo)
            codes = faiss.rev_swig_ptr(lists.get_codes(int(i)), (hi - lo) * d * 4)
            vectors[lo:hi] = codes.view(np.float32).reshape(-1, d)
        return offsets, ids, vectors

    def _list_extents(self, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Per list: ball radius r = max ‖x − c‖ and cone angle θ = max ∠(x̂, ĉ) (float64, chord form); 0 when empty.

        Row-wise in chunks of all lists at once, then a max per list (a Python loop per list cost more than the
        arithmetic at N / 64 lists).
        """
        radius = np.zeros(self.nlist)
        theta = np.zeros(self.nlist)
        if self.ntotal == 0:
            return radius, theta
        list_of = np.repeat(np.arange(self.nlist), self._sizes)
        dist, chord = np.empty(self.ntotal), np.empty(self.ntotal)
        for lo in range(0, self.ntotal, chunk):
            rows = list_of[lo : lo + chunk]
            x, c = self._sorted[lo : lo + chunk].astype(np.float64), self._centroids[rows].astype(np.float64)
            dist[lo : lo + chunk] = np.linalg.norm(x - c, axis=1)
            unit = x / np.linalg.norm(x, axis=1, keepdims=True)
            chord[lo : lo + chunk] = np.linalg.norm(unit - c / self._centroid_norms[rows, None], axis=1)
        full = self._sizes > 0
        starts = self._offsets[:-1][full]
        radius[full] = np.maximum.reduceat(dist, starts)
        theta[full] = 2.0 * np.arcsin(np.minimum(np.maximum.reduceat(chord, starts) / 2.0, 1.0))
        return radius, theta

    def _list_thresholds(self, tau: float) -> np.ndarray:
        """(nlist,) t such that a list may hold a member with ⟨q, x⟩ ≥ τ only if ⟨q, c⟩ ≥ t.

        Ball: ⟨q, c⟩ ≥ τ − r. Cone: φ ≤ θ + arccos τ ⇔ ⟨q, c⟩ ≥ ‖c‖ cos(θ + arccos τ) (always when θ + arccos τ ≥ π).
        """
        angle = self._theta + np.arccos(np.clip(tau, -1.0, 1.0))
        cone = np.where(angle >= np.pi, -np.inf, self._centroid_norms * np.cos(np.minimum(angle, np.pi)))
        t = np.maximum(tau - self._radius, cone) - BOUND_MARGIN
        return np.where(self._sizes > 0, t, np.inf).astype(np.float32)

    def bounds(self, qc: np.ndarray) -> np.ndarray:
        """(Q, nlist) float64 upper bounds on ⟨q, x⟩ over each list's members, from ``qc = q @ centroids.T``."""
        qc = qc.astype(np.float64)
        cos_phi = np.clip(qc / self._centroid_norms, -1.0, 1.0)
        cone = cos_phi * self._cos_theta + np.sqrt(1.0 - cos_phi**2) * self._sin_theta
        bound = np.minimum(qc + self._radius, np.where(cos_phi >= self._cos_theta, 1.0, cone)) + BOUND_MARGIN
        return np.where(self._sizes > 0, bound, -np.inf)

    def search(self, queries: np.ndarray, *, k: int = 1, threshold: float | None = None) -> Neighbours:
        """See `SiteIndex.search`; ``threshold=None`` runs a second pass at each query's first-pass k-th best."""
        q = self._check_queries(queries, k)
        parts = []
        with progress_bar(f"search bounded IVF index ({len(q)} queries)", total=len(q)) as advance:
            for start in range(0, len(q), QUERY_CHUNK):
                parts.append(self._search_chunk(q[start : start + QUERY_CHUNK], k=k, threshold=threshold))
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
        qc = chunk @ self._centroids.T
        nprobe = min(self.nprobe, self.nlist)
        nearest = qc.argmax(axis=1)[:, None] if nprobe == 1 else np.argpartition(-qc, nprobe - 1, axis=1)
        probe = np.zeros(qc.shape, dtype=bool)
        np.put_along_axis(probe, nearest[:, :nprobe], True, axis=1)
        if threshold is None:
            first = self._scan(chunk, probe, k=k)[0][:, k - 1 : k]
            probe |= self.bounds(qc) >= first
        else:
            probe |= qc >= self._list_thresholds(threshold)
        probe &= self._sizes > 0
        sim, idx = self._scan(chunk, probe, k=k)
        if threshold is None:
            exact = np.ones(len(chunk), dtype=bool)
        else:  # the ball bound of the best list left out: cheap, conservative
            qc += self._radius32
            np.putmask(qc, probe, -np.inf)
            exact = sim[:, k - 1] >= qc.max(axis=1)
        return sim, idx, exact, int(probe.sum(axis=0) @ self._sizes)

    def _scan(self, q: np.ndarray, probe: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of each query over the members of its probed lists: ((Q, k) similarity, (Q, k) ids).

        List-major: each probed list is read once and multiplied with all its queries (BLAS), which keeps the
        list in cache; a query-major scan (``search_preassigned``) streams every list once per query.
        """
        sim = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        by_list = np.ascontiguousarray(probe.T)
        for i in np.flatnonzero(by_list.any(axis=1)):
            rows = np.flatnonzero(by_list[i])
            list_ids, members = self._members(int(i))
            cand = np.concatenate([sim[rows], q[rows] @ members.T], axis=1)
            cand_ids = np.concatenate([ids[rows], np.broadcast_to(list_ids, (len(rows), len(list_ids)))], axis=1)
            top = cand.argmax(axis=1)[:, None] if k == 1 else np.argpartition(-cand, k - 1, axis=1)[:, :k]
            sim[rows] = np.take_along_axis(cand, top, axis=1)
            ids[rows] = np.take_along_axis(cand_ids, top, axis=1)
        order = np.argsort(-sim, axis=1, kind="stable")
        return np.take_along_axis(sim, order, axis=1), np.take_along_axis(ids, order, axis=1)

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
