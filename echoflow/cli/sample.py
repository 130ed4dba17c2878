"""`echoflow sample`: draw latent frames, animate them at requested EFs, decode, write AVIs."""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from echoflow.cli.common import OVERRIDES
from echoflow.config import apply_runtime, load_config
from echoflow.study.generate import Sampling, generate_videos, write_synthetic
from echoflow.study.models import Models


def sample(
    out: Path = typer.Option(..., "--out", help="Folder for the synthetic videos (EchoNet layout)."),
    n: int = typer.Option(16, "--n", help="Number of videos."),
    ef_min: float = typer.Option(20.0, help="Lowest requested EF, percent."),
    ef_max: float = typer.Option(75.0, help="Highest requested EF, percent (EFs are spread evenly)."),
    frames: int = typer.Option(32, help="Frames per video; longer than a training clip uses overlapping windows."),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Generate synthetic echo videos with the trained models of <workdir> (not yet audited: see `audit run`).

    New latent frames come from the latent image flow, are animated by the latent video flow at EFs spread
    over [ef-min, ef-max], and are decoded by the VAE; videos are written at data.clip_fps.
    """
    cfg = load_config(overrides)
    apply_runtime(cfg)
    out_videos = generate_videos(Models.load(cfg), n, lambda count, _: torch.linspace(ef_min, ef_max, count),
                                 Sampling.of(cfg, frames=frames), generator=torch.Generator().manual_seed(cfg.seed))
    write_synthetic(out, out_videos.videos, out_videos.ef, fps=cfg.data.clip_fps)
    typer.echo(f"wrote {n} synthetic videos to {out} (unaudited)")
