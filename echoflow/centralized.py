"""Centralized training of a stage on a cohort folder, and the site-local latents the latent stages train on.

Outputs live in the run's working directory (``cfg.workdir``):

    cohort/site_00 ...            the phantom cohort (when ``data.source=phantom``)
    <stage>/checkpoint.*          trainer state, for resume
    <stage>/model.safetensors     the stage's final (EMA) network weights
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import mlflow
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save
from torch import nn
from torch.utils.data import Dataset

from echoflow.audit.canaries import TRANSFORMS
from echoflow.data.phantom import generate_cohort
from echoflow.data.sites import ClipDataset, FrameDataset, PatientPairDataset, SiteData, load_sites
from echoflow.errors import EchoFlowError
from echoflow.models.vae import AdversarialVAE, measure_latent_scale
from echoflow.progress import progress_bar
from echoflow.stages import build_network, build_stage
from echoflow.training import Batch, TrainConfig, Trainer, random_batches
from echoflow.verified import load_safetensors, read_verified, write_verified

LATENT_STAGES = ("image_flow", "reid", "video_flow")
"""Stages that train on VAE latents rather than pixels."""


def plain(cfg: Any) -> Any:
    """A config node as plain Python containers (constructor kwargs)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def cohort_roots(cfg: DictConfig) -> list[Path]:
    """The site folders of the run: the user's ``data.roots``, or a phantom cohort generated once."""
    if cfg.data.source != "phantom":
        roots = [Path(root) for root in cfg.data.roots]
        if not roots:
            raise EchoFlowError(f"data.roots: give one folder per site for data.source={cfg.data.source}")
        return roots
    out = Path(cfg.workdir) / "cohort"
    marker = out / "done"
    if not marker.exists():
        generate_cohort(out, sites=cfg.data.sites, patients_per_site=cfg.data.patients_per_site, seed=cfg.seed,
                        size=cfg.data.size, frames=cfg.data.frames)
        marker.write_text("ok\n")
    return sorted(path for path in out.iterdir() if path.is_dir())


def load_split(cfg: DictConfig, splits: Sequence[str]) -> list[SiteData]:
    """Every site's videos of ``splits``, decoded at ``data.size``."""
    return load_sites(cohort_roots(cfg), size=cfg.data.size, splits=splits)


@torch.no_grad()
def encode_sites(vae: AdversarialVAE, sites: Sequence[SiteData], *, batch_size: int = 256) -> list[SiteData]:
    """The same sites with every video replaced by its scaled VAE latent means, (T, C, h, w) float32.

    Encoding happens per site, as in the federation: latents never mix across sites.
    """
    vae.eval()
    encoded = []
    with progress_bar("encode videos to latents", total=sum(len(site.videos) for site in sites)) as advance:
        for site in sites:
            latents = []
            for video in site.videos:
                frames = torch.from_numpy(video).float().div(127.5).sub(1.0).unsqueeze(1)
                chunks = [vae.encode_latent(chunk) for chunk in frames.split(batch_size)]
                latents.append(torch.cat(chunks).numpy().astype(np.float32))
                advance(1)
            encoded.append(replace(site, videos=latents))
    return encoded


REID_TWINS = ("mirror", "shift", "gain", "speckle")
"""Transforms whose copies of a video count as the same patient when training re-id (the audit's canaries)."""


def with_twins(sites: Sequence[SiteData], *, seed: int) -> list[SiteData]:
    """Each site's pixel videos plus one transformed copy per `REID_TWINS` entry, as more visits of the patient.

    Trained on these, the re-id model matches a mirrored, shifted, re-gained or re-speckled copy of a real frame
    to its patient, so the audit withholds such copies too.
    """
    rng = np.random.default_rng(seed)
    out = []
    for site in sites:
        videos, records = list(site.videos), list(site.records)
        for name in REID_TWINS:
            for record, video in zip(site.records, site.videos, strict=True):
                twin = TRANSFORMS[name](video.astype(np.float32) / 127.5 - 1.0, rng)
                videos.append(((twin + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8))
                records.append(record)
        out.append(replace(site, videos=videos, records=records))
    return out


def stage_sites(name: str, sites: Sequence[SiteData], vae: AdversarialVAE | None, *, seed: int) -> list[SiteData]:
    """What stage ``name`` trains on: the pixel sites (vae, ef), or their latents under ``vae`` (re-id: with twins)."""
    if name not in LATENT_STAGES:
        return list(sites)
    if vae is None:
        raise EchoFlowError(f"{name}: the latent stages need the trained VAE")
    return encode_sites(vae, with_twins(sites, seed=seed) if name == "reid" else sites)


def stage_dataset(name: str, sites: Sequence[SiteData], cfg: DictConfig) -> Dataset[Batch]:
    """The dataset stage ``name`` trains on (pixel sites for vae/ef, latent sites for the others)."""
    clip = {"frames": cfg.data.clip_frames, "fps": cfg.data.clip_fps}
    if name in ("vae", "image_flow"):
        return FrameDataset(sites)
    if name == "reid":
        return PatientPairDataset(sites)
    return ClipDataset(sites, **clip)


def save_network(net: nn.Module, path: Path) -> None:
    """Final weights as safetensors (no pickle), listed with their sha256 in ``<stem>.sha256``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    write_verified(path.with_suffix(".sha256"), {path.name: save(tensors)})


def load_network(name: str, cfg: DictConfig, *, path: Path | None = None) -> nn.Module:
    """Stage ``name``'s trained network from ``path`` (default ``<workdir>/<name>/model.safetensors``), in eval mode."""
    path = Path(cfg.workdir) / name / "model.safetensors" if path is None else path
    if not path.exists():
        raise EchoFlowError(f"{path}: no trained {name} model; run `echoflow train {name}` first")
    net = build_network(name, plain(cfg.model))
    try:
        net.load_state_dict(load_safetensors(path, read_verified(path.with_suffix(".sha256"), [path.name])[path.name]))
    except RuntimeError as err:
        raise EchoFlowError(f"{path}: weights do not fit the configured {name} network "
                            "(was the model config changed?)") from err
    return net.eval()


def log_metrics(prefix: str) -> Any:
    """An ``on_metrics`` callback logging to the active MLflow run (no-op without one)."""

    def log(step: int, values: dict[str, float]) -> None:
        if mlflow.active_run() is not None:
            mlflow.log_metrics({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    return log


def train_stages(cfg: DictConfig, names: Sequence[str], *, quiet: bool = False) -> dict[str, nn.Module]:
    """Train ``names`` in order on the pooled TRAIN split; the latent stages encode with the trained VAE."""
    pixels = load_split(cfg, ["TRAIN"])
    vae: AdversarialVAE | None = None
    trained = {}
    for name in names:
        if name in LATENT_STAGES and vae is None:
            vae = cast(AdversarialVAE, load_network("vae", cfg))
        trained[name] = train_stage(name, cfg, stage_sites(name, pixels, vae, seed=cfg.seed), quiet=quiet)
    return trained


def train_stage(name: str, cfg: DictConfig, sites: Sequence[SiteData], *, out: Path | None = None,
                quiet: bool = False) -> nn.Module:
    """Train stage ``name`` on ``sites`` (pixels or latents as the stage needs), resuming if interrupted.

    Returns the final network (EMA weights when kept), also saved to ``<out>/model.safetensors`` (default
    ``out``: ``<workdir>/<name>``, where `load_network` looks).
    For the VAE, the latent scale (1 / std of latent means on the training frames) is measured and stored.
    Initial weights come from ``cfg.seed`` alone (as the federation server's do), not from whatever drew random
    numbers earlier in the process: the parity regressors start equal, and a resumed pipeline trains as a fresh one.
    """
    stage_cfg = cfg.train[name]
    torch.manual_seed(cfg.seed)
    stage = build_stage(name, plain(cfg.model), plain(stage_cfg.loss))
    trainer = Trainer(stage, TrainConfig(**plain(stage_cfg.optim), seed=cfg.seed), device=cfg.device)
    out = Path(cfg.workdir) / name if out is None else out
    trainer.resume(out)
    dataset = stage_dataset(name, sites, cfg)
    trainer.fit(random_batches(dataset, batch_size=trainer.config.batch_size), checkpoint_dir=out,
                on_metrics=log_metrics(name), quiet=quiet)
    net = trainer.averaged_model().cpu().eval()
    if isinstance(net, AdversarialVAE):
        frames = torch.from_numpy(np.concatenate([video for site in sites for video in site.videos]))
        measure_latent_scale(net, frames.float().div(127.5).sub(1.0).unsqueeze(1))
    save_network(net, out / "model.safetensors")
    return net
