"""Small patient-like clustered embeddings; one BLAS/faiss thread (2 shared cores)."""

import faiss
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from echoflow.audit import build_index, calibrate
from tests.audit.synthetic import PatientSpace

faiss.omp_set_num_threads(1)
threadpool_limits(1)


@pytest.fixture(scope="module")
def cohort() -> dict:
    """Two sites of 150 patients × 20 frames (train) + 30 held-out patients × 5 frames; 300 fresh patients."""
    rng = np.random.default_rng(1)
    space = PatientSpace.random(dim=32, factors=6, seed=1)
    train, heldout = {}, {}
    for site in ("a", "b"):
        train[site] = space.frames(space.patients(150, rng), 20, rng)[0]
        heldout[site] = space.frames(space.patients(30, rng), 5, rng)[0]
    fresh = space.frames(space.patients(300, rng), 1, rng)[0]
    indexes = {s: build_index(x, kind="bounded_ivf" if s == "a" else "exact") for s, x in train.items()}
    return {"train": train, "heldout": heldout, "fresh": fresh, "indexes": indexes,
            "calibration": calibrate(indexes, heldout)}
