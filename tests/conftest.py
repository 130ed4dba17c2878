"""Shared fixtures: one torch thread per process (2 shared cores), deterministic seeds."""

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 -- code under test may use the legacy global RNG
