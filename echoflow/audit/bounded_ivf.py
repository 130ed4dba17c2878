"""An inverted-file index whose threshold decision is exact: probe every list that could hold a match.

For a list with centroid c and members x (unit vectors, as `prepare` makes them), and a unit query q:

- ball bound: ⟨q, x⟩ = ⟨q, c⟩ + ⟨q, x − c⟩ ≤ ⟨q, c⟩ + r, with r = max ‖x − c‖ over the list;
- cone bound: if every member lies within angle θ of ĉ = c/‖c‖ and q at angle φ from ĉ, then
  ⟨q, x⟩ ≤ cos(max(0, φ − θ)), which is tighter on the sphere. θ comes from the chord ‖x − ĉ‖ with a margin
  for float32 rounding (`list_extents`), robust for lists of members within ~1e-4 rad of ĉ.

Per query we probe every list whose bound (the smaller of the two, plus a float32 safety margin) reaches τ, and
the ``nprobe`` lists of the best ball bound for an approximate nearest neighbour. Inner products with the
members of probed lists are exact, so no real sample over τ is missed, while a high τ skips most lists. A
returned maximum is exact whenever it is at least every unprobed list's bound; otherwise it is a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass
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
# a search chunk's (nlist, Q) centroid products: ≤ 2**26 entries (256 MiB float32), so most lists are read once
CHUNK_ENTRIES = 2**26
# queries per step of the probe: an (nlist, tile) float32 block of centroid products that stays in cache
PROBE_TILE = 256


# float32 rounding of a prepared member (norm 1 ± 1e-7), of the unit centroid and of the difference: < 1e-6 of chord
CHORD_MARGIN = 1e-6


@dataclass(frozen=True)
class Lists:
    """Inverted lists stored list after list (list i holds rows ``offsets[i]:offsets[i + 1]``).

    Attributes:
        centroids: (L, D) float32, each list's centre (e.g. its member mean).
        offsets: (L + 1,) int64 row offsets.
        ids: (N,) int64 local sample id of each stored row.
        vectors: (N, D) float32 prepared unit vectors, list-sorted.
        radius: (L,) float64 ball radius, see `list_extents`.
        theta: (L,) float64 cone angle, see `list_extents`.
    """

    centroids: np.ndarray
    offsets: np.ndarray
    ids: np.ndarray
    vectors: np.ndarray
    radius: np.ndarray
    theta: np.ndarray


def list_extents(vectors: np.ndarray, centroids: np.ndarray, offsets: np.ndarray,
                 chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per list: ball radius r ≥ max ‖x − c‖ and cone angle θ ≥ max ∠(x, ĉ); 0 for an empty list.

    Chord form: θ = 2·asin(max ‖x − ĉ‖ / 2), never arccos of a minimum cosine, which loses tight lists (members
    within ~1e-4 rad of ĉ) to rounding: a float32 member of norm 1 + 3e-8 has a cosine that rounds to 1, so θ came
    out 0 and over-τ pairs just beyond the list's edge were skipped. Differences in float32 (exact for near
    vectors), squares summed in float64, then `CHORD_MARGIN` covers the rounding of the float32 operands.

    Args:
        vectors: (N, D) float32 prepared unit vectors, list-sorted.
        centroids: (L, D) float32 list centres.
        offsets: (L + 1,) row offsets of the lists in ``vectors`` (from 0 to N).
        chunk: rows per step (bounds the temporaries).
    """
    sizes = np.diff(offsets)
    radius, theta = np.zeros(len(sizes)), np.zeros(len(sizes))
    if len(vectors) == 0:
        return radius, theta
    norms = np.maximum(np.sqrt(np.einsum("ij,ij->i", centroids, centroids, dtype=np.float64)), 1e-12)
    unit = (centroids / norms[:, None]).astype(np.float32)
    list_of = np.repeat(np.arange(len(sizes)), sizes)
    dist, chord = np.empty(len(vectors)), np.empty(len(vectors))
    for lo in range(0, len(vectors), chunk):
        x, rows = vectors[lo : lo + chunk], list_of[lo : lo + chunk]
        for centre, out in ((centroids, dist), (unit, chord)):
            diff = x - centre[rows]
            out[lo : lo + chunk] = np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float64))
    full = sizes > 0
    starts = offsets[:-1][full]
    radius[full] = np.maximum.reduceat(dist, starts) + CHORD_MARGIN
    theta[full] = 2.0 * np.arcsin(np.minimum((np.maximum.reduceat(chord, starts) + CHORD_MARGIN) / 2.0, 1.0))
    return radius, theta


class BoundedIVFIndex(SiteIndex):
    """``faiss.IndexIVFFlat`` (inner product) plus per-list radii; exact at the threshold.

    faiss trains the lists (k-means), assigns and stores the members, and persists them; the search reads the
    lists in place (no copy) and scans them list-major with BLAS.
    """

    kind = "bounded_ivf"

    def __init__(self, ivf: faiss.IndexIVF, *, similarity: Similarity, nprobe: int = 1,
                 lists: Lists | None = None) -> None:
        """Wrap a trained ``ivf``.

        ``lists``: when the builder already holds the lists list-sorted with their extents (``ivf``'s quantizer
        holding ``lists.centroids``); ``ivf``'s own lists are then left empty until `save`.
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
            self._radius, self._theta = list_extents(self._sorted, self._centroids, self._offsets)
        else:
            self._offsets, self._sorted_ids, self._sorted = lists.offsets, lists.ids, lists.vectors
            self._sizes = np.diff(self._offsets)
            self._radius, self._theta = lists.radius, lists.theta
        self._cos_theta, self._sin_theta = np.cos(self._theta), np.sin(self._theta)
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

    def _list_thresholds(self, tau: float) -> np.ndarray:
        """(nlist,) t such that a list may hold a member with ⟨q, x⟩ ≥ τ only if ⟨q, c⟩ ≥ t.

        Ball: ⟨q, c⟩ ≥ τ − r. Cone: φ ≤ θ + arccos τ ⇔ ⟨q, c⟩ ≥ ‖c‖ cos(θ + arccos τ) (always when θ + arccos τ ≥ π).
        """
        angle = self._theta + np.arccos(np.clip(tau, -1.0, 1.0))
        cone = np.where(angle >= np.pi, -np.inf, self._centroid_norms * np.cos(np.minimum(angle, np.pi)))
        t = np.maximum(tau - self._radius, cone) - BOUND_MARGIN
        return np.where(self._sizes > 0, t, np.inf).astype(np.float32)

    def bounds(self, qc: np.ndarray) -> np.ndarray:
        """(nlist, Q) float64 upper bounds on ⟨q, x⟩ over each list's members, from ``qc = centroids @ q.T``."""
        qc = qc.astype(np.float64)
        norms = self._centroid_norms[:, None]
        cos_theta, sin_theta = self._cos_theta[:, None], self._sin_theta[:, None]
        cos_phi = np.clip(qc / norms, -1.0, 1.0)
        cone = cos_phi * cos_theta + np.sqrt(1.0 - cos_phi**2) * sin_theta
        bound = np.minimum(qc + self._radius[:, None], np.where(cos_phi >= cos_theta, 1.0, cone)) + BOUND_MARGIN
        return np.where(self._sizes[:, None] > 0, bound, -np.inf)

    def search(self, queries: np.ndarray, *, k: int = 1, threshold: float | None = None) -> Neighbours:
        """See `SiteIndex.search`; ``threshold=None`` runs a second pass at each query's first-pass k-th best."""
        q = self._check_queries(queries, k)
        parts = []
        step = max(QUERY_CHUNK, CHUNK_ENTRIES // max(self.nlist, 1))
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
        """`search` of prepared queries: ((Q, k) similarity, (Q, k) ids, (Q,) exact, real vectors compared).

        The probe is list-major, (nlist, Q), so a probed list's queries are one contiguous run of `np.nonzero`;
        it is filled in query tiles whose (nlist, tile) centroid products stay in cache.
        """
        probe = np.zeros((self.nlist, len(chunk)), dtype=bool)
        ceiling = np.empty(len(chunk), dtype=np.float32)  # per query, the best ball bound of an unprobed list
        limit = None if threshold is None else (self._list_thresholds(threshold) + np.maximum(self._radius32, 0))[:, None]
        nprobe = min(self.nprobe, self.nlist)
        for lo in range(0, len(chunk), PROBE_TILE):
            ball = self._centroids @ chunk[lo : lo + PROBE_TILE].T
            ball += self._radius32[:, None]  # ⟨q, c⟩ + r ≥ ⟨q, x⟩; -inf for an empty list
            tile = probe[:, lo : lo + PROBE_TILE]
            if nprobe == 1:  # the list of the best ball bound (ties: all); argmax along axis 0 is a slow strided pass
                np.equal(ball, ball.max(axis=0), out=tile)
            elif nprobe > 1:
                np.put_along_axis(tile, np.argpartition(-ball, nprobe - 1, axis=0)[:nprobe], True, axis=0)
            if limit is not None:
                tile |= ball >= limit
                np.putmask(ball, tile, -np.inf)
                ceiling[lo : lo + PROBE_TILE] = ball.max(axis=0)
        if threshold is None:
            first = self._scan(chunk, probe, k=k)[0][:, k - 1]
            for lo in range(0, len(chunk), PROBE_TILE):
                bound = self.bounds(self._centroids @ chunk[lo : lo + PROBE_TILE].T)
                probe[:, lo : lo + PROBE_TILE] |= bound >= first[lo : lo + PROBE_TILE]
        probe[self._sizes == 0] = False
        sim, idx = self._scan(chunk, probe, k=k)
        exact = np.ones(len(chunk), dtype=bool) if threshold is None else sim[:, k - 1] >= ceiling
        return sim, idx, exact, int(self._sizes @ probe.sum(axis=1))

    def _scan(self, q: np.ndarray, probe: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of each query over the members of its probed lists: ((Q, k) similarity, (Q, k) ids).

        ``probe`` is (nlist, Q). List-major: each probed list is read once and multiplied with all its queries
        (BLAS), which keeps the list in cache (a query-major scan, faiss's ``search_preassigned``, streams every
        list once per query). Each (list, query) pair keeps its list's top-k; one merge per query follows.
        """
        lists, rows = np.nonzero(probe)
        cuts = np.flatnonzero(np.diff(lists)) + 1
        starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(lists)]])
        pair_sim = np.full((len(rows), k), -np.inf, dtype=np.float32)
        pair_pos = np.zeros((len(rows), k), dtype=np.int64)  # row of the list-sorted copy
        for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
            i = int(lists[lo])
            base, size = int(self._offsets[i]), int(self._sizes[i])
            s = q[rows[lo:hi]] @ self._sorted[base : base + size].T
            if k == 1:
                top = s.argmax(axis=1)[:, None]
            else:
                top = np.argsort(-s, axis=1)[:, :k] if size <= k else np.argpartition(-s, k - 1, axis=1)[:, :k]
            pair_sim[lo:hi, : top.shape[1]] = np.take_along_axis(s, top, axis=1)
            pair_pos[lo:hi, : top.shape[1]] = base + top
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
