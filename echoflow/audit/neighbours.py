"""The abstract idea of the audit's per-site index: similarities, the result dataclass, the protocol.

Both similarities map to an inner product of preprocessed unit vectors, so one inner-product index serves both:

- ``cosine``: ``x / ‖x‖``.
- ``pearson``: ``(x - mean(x)) / ‖x - mean(x)‖``, the mean taken over the D components of each vector, so the
  inner product of two prepared vectors is their Pearson correlation (the reference filter, EchoNet-Synthetic's
  ``echosyn/privacy/apply.py``, thresholds Pearson correlations of re-id embeddings). Per-vector statistics only:
  a site needs nothing from other sites to prepare its vectors.
"""

from __future__ import annotations

import json
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np

from echoflow.errors import EchoFlowError
from echoflow.verified import write_verified

Similarity = Literal["cosine", "pearson"]
PREPARE_CHUNK = 4096  # rows per step of `prepare` (2 MiB of 128-d float32)
# An index builds or searches in at most one thread per core of this process at a time. The audit asks every site
# in a thread of its own (`echoflow.audit.decide.query_sites`); on one machine, more sites at once than cores only
# trade caches: 4 sites' bounded-IVF searches on 2 cores took ~25 % more CPU time 4 at a time than 2 at a time.
CPU_SLOTS = threading.BoundedSemaphore(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                       else os.cpu_count() or 1)
SIMILARITIES: tuple[str, ...] = get_args(Similarity)


def prepare(vectors: np.ndarray, *, similarity: Similarity, what: str = "embeddings",
            out: np.ndarray | None = None) -> np.ndarray:
    """Map raw embeddings to unit vectors whose inner product is the chosen similarity.

    Args:
        vectors: (N, D) real embeddings (any float dtype).
        similarity: ``cosine`` or ``pearson``.
        what: names the input in error messages.
        out: (N, D) float32 to write the result into (e.g. a slice of a larger array); a new array if None.

    Returns:
        (N, D) float32, each row of norm 1 (``out`` when given, else C-contiguous).
    """
    if similarity not in SIMILARITIES:
        raise EchoFlowError(f"audit.similarity: expected one of {SIMILARITIES}, got {similarity!r}")
    if np.ndim(vectors) != 2 or np.shape(vectors)[0] == 0:
        raise EchoFlowError(f"{what}: expected a non-empty (N, D) array, got shape {np.shape(vectors)}")
    x = np.empty(np.shape(vectors), dtype=np.float32) if out is None else out
    zero = 0
    for lo in range(0, len(x), PREPARE_CHUNK):  # each step on a cache-sized block: one read of the input
        part = x[lo : lo + PREPARE_CHUNK]
        np.copyto(part, vectors[lo : lo + PREPARE_CHUNK], casting="same_kind")
        if not np.isfinite(part).all():
            raise EchoFlowError(f"{what}: contains NaN or inf")
        zero += normalise(part, similarity=similarity)
    if zero:
        raise EchoFlowError(f"{what}: {zero} vector(s) have zero norm ({similarity})")
    return x


def normalise(x: np.ndarray, *, similarity: Similarity) -> int:
    """`prepare`'s arithmetic in place on finite float32 rows ``x`` (N, D), unchecked; returns the zero-norm rows.

    For rows known to be finite (checked once when an index was built), e.g. the few an index compares exactly.
    """
    if similarity == "pearson":
        x -= x.mean(axis=1, keepdims=True)
    # squared norms summed in float64 (no overflow, no cancellation); the rows themselves stay float32
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))[:, None]
    x /= np.maximum(norms, 1e-12).astype(np.float32)
    return int((norms < 1e-12).sum())


@dataclass(frozen=True)
class Neighbours:
    """One site's answer to a query batch: only similarities and local sample ids travel.

    Attributes:
        similarity: (Q, k) float32, descending per row; -inf where fewer than k samples were compared.
        ids: (Q, k) int64 local sample ids (row order of the site's real embeddings); -1 where none.
        exact: (Q,) bool; True where ``similarity[q]`` is exactly the true top-k. Wherever
            ``similarity[q, 0] >= threshold`` the maximum is exact regardless (that is the guarantee the
            release decision rests on); elsewhere a False row's values are lower bounds.
        scanned: share of (query, real sample) pairs whose inner product was computed, 0-1.
    """

    similarity: np.ndarray
    ids: np.ndarray
    exact: np.ndarray
    scanned: float


class SiteSearcher(Protocol):
    """What the audit needs from a site; a federated client implements this by a remote call."""

    def search(self, queries: np.ndarray, *, k: int, threshold: float | None) -> Neighbours:
        """Answer a (Q, D) batch of raw generated embeddings; see `SiteIndex.search`."""
        ...


class SiteIndex(ABC):
    """An exact-decision index of one site's real embeddings (inner product of prepared vectors).

    Attributes:
        kind: ``exact`` | ``bounded_ivf`` — written to the sidecar so `load_index` rebuilds the right class.
        similarity: ``cosine`` | ``pearson``; applied to the stored and the query vectors alike.
    """

    kind: str
    similarity: Similarity

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Number of real samples indexed."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Embedding dimension D."""

    @abstractmethod
    def search(self, queries: np.ndarray, *, k: int = 1, threshold: float | None = None) -> Neighbours:
        """Top-k real neighbours of each query, exact wherever the decision depends on it.

        Args:
            queries: (Q, D) raw embeddings; prepared with this index's similarity.
            k: neighbours per query.
            threshold: the release threshold τ. Every real sample with similarity ≥ τ to a query is compared
                exactly, so ``similarity[:, 0] >= τ`` is exact. ``None`` asks for the exact top-k of every query.
        """

    @abstractmethod
    def vectors(self) -> np.ndarray:
        """(N, D) float32 prepared vectors, row i = local id i (for brute-force checks; stays on site)."""

    @abstractmethod
    def _write(self, path: Path) -> dict[str, Any]:
        """Write the faiss file(s) at ``path``; return the kind-specific sidecar fields."""

    def save(self, path: Path) -> None:
        """Write ``path`` (faiss index), its ``.json`` sidecar (kind, similarity, ...) and ``.sha256`` manifest."""
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "similarity": self.similarity, "dim": self.dim, "ntotal": self.ntotal}
        meta |= self._write(path)
        write_verified(path.with_suffix(".sha256"), {path.name: path.read_bytes(),
                                                     path.with_suffix(".json").name: json.dumps(meta).encode()})

    def _check_queries(self, queries: np.ndarray, k: int) -> np.ndarray:
        if k < 1:
            raise EchoFlowError(f"audit.k: expected ≥ 1, got {k}")
        q = prepare(queries, similarity=self.similarity, what="generated embeddings")
        if q.shape[1] != self.dim:
            raise EchoFlowError(f"generated embeddings: dimension {q.shape[1]} ≠ site index dimension {self.dim}")
        return q


def threshold_recall(index: SiteIndex, queries: np.ndarray, *, threshold: float, max_queries: int = 512) -> float:
    """Share of (query, real sample) pairs with similarity ≥ τ that ``index.search`` reports, by brute force.

    Only the maximum decides, so a query counts as recalled when its reported maximum is ≥ τ whenever the
    true maximum is. Checks the first ``max_queries`` queries. Returns 1.0 when no pair reaches τ.
    """
    q = prepare(queries[:max_queries], similarity=index.similarity, what="generated embeddings")
    real = index.vectors()
    best = np.full(len(q), -np.inf, dtype=np.float32)
    for start in range(0, len(real), 65536):
        best = np.maximum(best, (q @ real[start : start + 65536].T).max(axis=1))
    truth = best >= threshold
    found = index.search(queries[:max_queries], k=1, threshold=threshold).similarity[:, 0] >= threshold
    return 1.0 if not truth.any() else float((found & truth).sum() / truth.sum())
