"""A low-dimensional map of unit vectors whose inner products bound the original ones from above.

With V (D, m) an orthonormal basis (the top principal directions of a site's prepared real vectors) and a unit
vector x, let z(x) = [Vᵀx, ‖x − VVᵀx‖] ∈ R^(m+1). Then ‖z(x)‖ = ‖x‖ = 1 and, by Cauchy-Schwarz on the part
outside span(V),

    ⟨q, x⟩ = ⟨Vᵀq, Vᵀx⟩ + ⟨q − VVᵀq, x − VVᵀx⟩ ≤ ⟨z(q), z(x)⟩.

So a pair can reach τ only if its (m+1)-dimensional product does: the bounded IVF clusters, bounds and filters the
z's (m+1 = 25 numbers a pair instead of D = 128) and computes the exact product only for the pairs the filter
keeps. Re-id embeddings are nearly low-rank (on the audit benchmark's data the top 24 of 128 directions hold 94 %
of the energy), so the bound is tight: ~4e-5 of all pairs pass it at the audit's τ.

z is computed in float64 (exact to ~1e-15) and stored in float32 (rounding ~1e-7, inside the bounded IVF's float32
margin). A site's real rows are normalised in float64 on the way (`bound_space`): their prepared float32 copies,
which the exact products use, differ from those by ~1e-7, inside the same margin.
"""

from __future__ import annotations

import numpy as np

from echoflow.audit.neighbours import Similarity, prepare
from echoflow.errors import EchoFlowError

# principal directions kept: measured on the audit benchmark (1M re-id embeddings): 16 lets ~4x as many pairs
# through to the exact check, 32 scans ~30 % more numbers per pair for ~2x fewer survivors
PROJECTED_DIMS = 24
# rows of the sample the directions are estimated from (any orthonormal V keeps the bound; the sample only
# decides how tight it is)
BASIS_SAMPLE = 20_000


def principal_basis(vectors: np.ndarray, *, similarity: Similarity, dims: int = PROJECTED_DIMS,
                    seed: int = 0) -> np.ndarray | None:
    """(D, dims) float64 orthonormal top principal directions of ``vectors`` (N, D); None when ``dims + 1 >= D``.

    Uncentred, from a sample of the prepared rows.
    """
    n, d = np.shape(vectors)
    if dims + 1 >= d:
        return None
    rng = np.random.default_rng(seed)
    sample = prepare(vectors[np.sort(rng.choice(n, min(n, BASIS_SAMPLE), replace=False))], similarity=similarity,
                     what="real embeddings")
    # the float32 Gram matrix only steers which directions are kept; eigh makes them orthonormal in float64
    return np.ascontiguousarray(np.linalg.eigh((sample.T @ sample).astype(np.float64))[1][:, ::-1][:, :dims])


def bound_space(vectors: np.ndarray, *, similarity: Similarity, dims: int = PROJECTED_DIMS, seed: int = 0,
                chunk: int = 4096) -> tuple[np.ndarray | None, np.ndarray]:
    """(basis (D, dims) float64 or None, z (N, dims + 1) float32) of raw rows ``vectors`` (N, D).

    The basis: `principal_basis`. Rows are normalised and mapped ``chunk`` at a time, so no prepared (N, D) copy
    is ever held. None, and z the prepared rows themselves, when ``dims + 1 >= D``: the map would not shrink them.
    """
    basis = principal_basis(vectors, similarity=similarity, dims=dims, seed=seed)
    if basis is None:
        return None, prepare(vectors, similarity=similarity, what="real embeddings")
    n = len(vectors)
    z = np.empty((n, dims + 1), dtype=np.float32)
    zero = 0
    for lo in range(0, n, chunk):  # `prepare`'s checks and normalisation, in float64 and fused with the map
        part = np.asarray(vectors[lo : lo + chunk], dtype=np.float64)
        if similarity == "pearson":
            part = part - part.mean(axis=1, keepdims=True)
        squares = np.einsum("ij,ij->i", part, part)
        if not np.isfinite(squares).all():
            raise EchoFlowError("real embeddings: contains NaN or inf")
        zero += int((squares < 1e-24).sum())
        inside = (part @ basis) / np.sqrt(np.maximum(squares, 1e-24))[:, None]
        z[lo : lo + chunk, :-1] = inside
        z[lo : lo + chunk, -1] = np.sqrt(np.maximum(1.0 - np.einsum("ij,ij->i", inside, inside), 0.0))
    if zero:
        raise EchoFlowError(f"real embeddings: {zero} vector(s) have zero norm ({similarity})")
    return basis, z


def project(x: np.ndarray, basis: np.ndarray | None, *, chunk: int = 4096) -> np.ndarray:
    """(N, m+1) float32 z(x) of unit rows ``x`` (N, D) (see the module docstring); ``x`` itself when no basis."""
    if basis is None:
        return x
    out = np.empty((len(x), basis.shape[1] + 1), dtype=np.float32)
    for lo in range(0, len(x), chunk):
        part = x[lo : lo + chunk].astype(np.float64)
        inside = part @ basis
        rest = np.einsum("ij,ij->i", part, part) - np.einsum("ij,ij->i", inside, inside)
        out[lo : lo + chunk, :-1] = inside
        out[lo : lo + chunk, -1] = np.sqrt(np.maximum(rest, 0.0))
    return out
