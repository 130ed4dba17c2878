"""Per-site FAISS indexes for the audit: exact brute force for small sites, bounded IVF for large ones.

Measured on clustered patient-like data, HNSW lost true neighbours and SQ8/PQ flipped decisions at the
threshold, so no approximate score decides alone: both indexes here keep the release decision exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from echoflow.audit.bounded_ivf import QUERY_CHUNK, BoundedIVFIndex
from echoflow.audit.neighbours import Neighbours, Similarity, SiteIndex, prepare
from echoflow.errors import EchoFlowError
from echoflow.progress import progress_bar
from echoflow.verified import json_object, read_verified

IndexKind = Literal["auto", "exact", "bounded_ivf"]
AUTO_EXACT_BELOW = 50_000


class ExactIndex(SiteIndex):
    """Brute-force inner product (``faiss.IndexFlatIP``); every answer exact. On GPU when faiss has one."""

    kind = "exact"

    def __init__(self, flat: faiss.Index, *, similarity: Similarity) -> None:
        self.similarity = similarity
        self._cpu = flat
        self._search_index = faiss.index_cpu_to_all_gpus(flat) if faiss.get_num_gpus() > 0 else flat

    @classmethod
    def build(cls, vectors: np.ndarray, *, similarity: Similarity = "cosine") -> ExactIndex:
        """Index (N, D) raw real embeddings; local id i = row i."""
        x = prepare(vectors, similarity=similarity, what="real embeddings")
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        return cls(flat, similarity=similarity)

    @property
    def ntotal(self) -> int:  # noqa: D102
        return int(self._cpu.ntotal)

    @property
    def dim(self) -> int:  # noqa: D102
        return int(self._cpu.d)

    def search(self, queries: np.ndarray, *, k: int = 1, threshold: float | None = None) -> Neighbours:  # noqa: D102
        q = self._check_queries(queries, k)
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
        return self._cpu.reconstruct_n(0, self.ntotal)

    def _write(self, path: Path) -> dict[str, Any]:
        faiss.write_index(self._cpu, str(path))
        return {}


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
        nlist: IVF lists; default ≈ N / 64 (small lists keep radii tight), see `BoundedIVFIndex.build`.
        seed: k-means seed (IVF only).
    """
    if kind not in ("auto", "exact", "bounded_ivf"):
        raise EchoFlowError(f"audit.index: expected auto|exact|bounded_ivf, got {kind!r}")
    n = len(vectors)
    if kind == "exact" or (kind == "auto" and n < AUTO_EXACT_BELOW):
        return ExactIndex.build(vectors, similarity=similarity)
    return BoundedIVFIndex.build(vectors, similarity=similarity, nlist=nlist, seed=seed)


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
