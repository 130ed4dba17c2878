"""Patient-like clustered re-id embeddings for the audit's tests and benchmark (no real data needed).

Re-id embeddings of echo frames cluster by patient: a patient's frames are near-duplicates, and patients vary
along a few anatomical factors, so patient centres lie near a low-dimensional subspace of the embedding space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PatientSpace:
    """A random low-rank patient manifold in ``dim`` dimensions.

    Attributes:
        basis: (factors, dim) float64 map from anatomical factors to embedding space.
        patient_noise: per-component std of a patient centre's off-manifold part.
        frame_noise: per-component std of a frame's deviation from its patient centre.
    """

    basis: np.ndarray
    patient_noise: float
    frame_noise: float

    @classmethod
    def random(
        cls, *, dim: int = 128, factors: int = 12, patient_noise: float = 0.01, frame_noise: float = 0.01, seed: int = 0
    ) -> PatientSpace:
        """Draw a basis; noise stds are relative to a unit-scale centre (frames end up L2-normalised)."""
        basis = np.random.default_rng(seed).standard_normal((factors, dim)) / np.sqrt(factors)
        return cls(basis=basis, patient_noise=patient_noise, frame_noise=frame_noise)

    def patients(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, dim) float64 patient centres, unit norm."""
        c = rng.standard_normal((n, self.basis.shape[0])) @ self.basis
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        c += self.patient_noise * rng.standard_normal(c.shape)
        return c / np.linalg.norm(c, axis=1, keepdims=True)

    def frames(
        self, centres: np.ndarray, per_patient: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """``per_patient`` near-duplicate frames of each centre: ((P * per_patient, dim) float32, patient ids)."""
        x = np.repeat(centres, per_patient, axis=0)
        x += self.frame_noise * rng.standard_normal(x.shape)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32), np.repeat(np.arange(len(centres)), per_patient)


def near_copies(real: np.ndarray, n: int, *, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy copies of random rows of ``real`` (N, D): ((n, D) float32 unit vectors, source row ids)."""
    src = rng.choice(len(real), size=n, replace=False)
    x = real[src].astype(np.float64) + noise * rng.standard_normal((n, real.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), src
