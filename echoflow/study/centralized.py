"""The centralized baseline: a stage trained on the pooled TRAIN split of every site (no federation).

Outputs live in the run's working directory (``cfg.workdir``):

    <stage>/checkpoint.*          trainer state, for resume
    <stage>/model.safetensors     the stage's final (EMA) network weights
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from echoflow.config import plain
from echoflow.data.intensity import to_unit
from echoflow.data.sites import SiteData
from echoflow.models.vae import AdversarialVAE, measure_latent_scale
from echoflow.stages import LATENT_STAGES
from echoflow.stages.data import image_flow_frames, stage_dataset, stage_sites
from echoflow.stages.networks import save_network
from echoflow.stages.objectives import build_stage
from echoflow.stages.trainer import TrainConfig, Trainer, random_batches
from echoflow.study.models import Cohort, stage_folder, trained_network
from echoflow.tracking import log_metrics


def train_stages(cfg: DictConfig, names: Sequence[str], cohort: Cohort, *, quiet: bool = False
                 ) -> dict[str, nn.Module]:
    """Train ``names`` in order on the pooled TRAIN split; the latent stages encode with the trained VAE."""
    pixels = cohort.split("TRAIN")
    vae: AdversarialVAE | None = None
    trained: dict[str, nn.Module] = {}
    for name in names:
        if name in LATENT_STAGES and vae is None:
            net = trained["vae"] if "vae" in trained else trained_network(cfg, "vae")
            assert isinstance(net, AdversarialVAE)
            vae = net
        sites = image_flow_frames(pixels, cfg.train.image_flow.frames) if name == "image_flow" else pixels
        trained[name] = train_stage(name, cfg, stage_sites(name, sites, vae, seed=cfg.seed), quiet=quiet)
    return trained


def train_stage(name: str, cfg: DictConfig, sites: Sequence[SiteData], *, out: Path | None = None,
                quiet: bool = False, on_metrics: Callable[[int, dict[str, float]], None] | None = None
                ) -> nn.Module:
    """Train stage ``name`` on ``sites`` (pixels or latents as the stage needs), resuming if interrupted.

    Returns the final network (EMA weights when kept), also saved to ``<out>/model.safetensors`` (default
    ``out``: ``<workdir>/<name>``, where `trained_network` looks). Training metrics go to ``on_metrics``
    (default: the active MLflow run, as ``<name>/<metric>``).
    For the VAE, the latent scale (1 / std of latent means on the training frames) is measured and stored.
    Initial weights come from ``cfg.seed`` alone (as the federation server's do), not from whatever drew random
    numbers earlier in the process: the parity regressors start equal, and a resumed pipeline trains as a fresh one.
    """
    stage_cfg = cfg.train[name]
    torch.manual_seed(cfg.seed)
    stage = build_stage(name, plain(cfg.model), plain(stage_cfg.loss))
    trainer = Trainer(stage, TrainConfig(**plain(stage_cfg.optim), seed=cfg.seed), device=cfg.device)
    out = stage_folder(cfg, name) if out is None else out
    trainer.resume(out)
    dataset = stage_dataset(name, sites, clip_frames=cfg.data.clip_frames, clip_fps=cfg.data.clip_fps)
    trainer.fit(random_batches(dataset, batch_size=trainer.config.batch_size), checkpoint_dir=out,
                on_metrics=on_metrics or log_metrics(name), quiet=quiet)
    net = trainer.averaged_model().cpu().eval()
    if isinstance(net, AdversarialVAE):
        measure_latent_scale(net, to_unit(np.concatenate([video for site in sites for video in site.videos]))
                             .unsqueeze(1))
    save_network(net, out / "model.safetensors")
    return net
