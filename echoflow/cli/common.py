"""Options and helpers shared by the command files."""

from __future__ import annotations

import torch
import typer
from omegaconf import DictConfig

OVERRIDES = typer.Argument(None, help="Hydra overrides, e.g. `train.vae.optim.steps=500 data.sites=2`.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars (also off when stderr is not a terminal).")



def apply_runtime(cfg: DictConfig) -> None:
    """Process-wide settings from the config: torch threads (1 per process is fastest on shared cores)."""
    torch.set_num_threads(cfg.threads)
