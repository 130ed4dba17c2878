"""`echoflow sample`: draw latent frames, animate them at requested EFs, decode, write AVIs."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import torch
import typer

from echoflow.centralized import load_network
from echoflow.cli.common import OVERRIDES, apply_runtime
from echoflow.config import load_config
from echoflow.generate import animate_frames, decode_clips, sample_latent_frames, to_uint8, write_synthetic
from echoflow.models.vae import AdversarialVAE


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
    vae = cast(AdversarialVAE, load_network("vae", cfg))
    s = cfg.train.sampling
    generator = torch.Generator().manual_seed(cfg.seed)
    latent_size = cfg.data.size // (vae.downsample)
    first = sample_latent_frames(load_network("image_flow", cfg), n, shape=(vae.latent_channels, latent_size,
                                 latent_size), steps=s.steps, method=s.method,
                                 target=cfg.train.image_flow.loss.target, generator=generator)
    ef = torch.linspace(ef_min, ef_max, n)
    latents = animate_frames(load_network("video_flow", cfg), first, ef, frames=frames,
                             window=cfg.data.clip_frames, steps=s.steps, method=s.method,
                             target=cfg.train.video_flow.loss.target, guidance=s.guidance, generator=generator)
    videos = to_uint8(decode_clips(vae, latents))
    write_synthetic(out, videos, np.asarray(ef), fps=cfg.data.clip_fps)
    typer.echo(f"wrote {n} synthetic videos to {out} (unaudited)")
