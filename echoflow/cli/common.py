"""Options and helpers shared by the command files."""

from __future__ import annotations

import torch
import typer
from omegaconf import DictConfig
from threadpoolctl import threadpool_limits

OVERRIDES = typer.Argument(None, help="Hydra overrides, e.g. `train.vae.optim.steps=500 data.sites=2`.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars (also off when stderr is not a terminal).")



def limit_threads(threads: int) -> None:
    """Cap torch's and the BLAS/OpenMP pools' threads (1 per process ran 5-10x faster on 2 busy cores)."""
    torch.set_num_threads(threads)
    threadpool_limits(threads)


def apply_runtime(cfg: DictConfig) -> None:
    """Process-wide settings from the config: threads per process."""
    limit_threads(cfg.threads)
