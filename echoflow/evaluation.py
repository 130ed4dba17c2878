"""What the trained models are worth, measured on held-out real data (the figures of the models issue).

- EF regressor: MAE/RMSE/R² on held-out real clips.
- VAE keeps what matters: EF measured on VAE-reconstructed clips vs on the originals.
- Re-id generalises: same- vs different-patient verification AUC on patients never seen in training.
- Image flow: Fréchet distance, in re-id embedding space, of sampled latents to held-out real latents, next to
  the real-vs-real floor and a trivial baseline (Gaussian latents).
- Video flow obeys EF: clips generated at requested EFs, decoded, measured by the real-trained regressor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from echoflow.audit.embed import embed
from echoflow.data.sites import ClipDataset, SiteData
from echoflow.generate import animate_frames, decode_clips, sample_latent_frames
from echoflow.metrics import Regression, frechet_distance, regression
from echoflow.models.flow import Method, Target
from echoflow.models.reid import verification_auc
from echoflow.models.vae import AdversarialVAE


def first_clips(sites: Sequence[SiteData], *, frames: int, fps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Every video's first clip (N, C, T, H, W), its EF (N,) percent and its site index (N,)."""
    dataset = ClipDataset(sites, frames=frames, fps=fps, random_start=False)
    items = [dataset[i] for i in range(len(dataset))]
    return tuple(torch.stack([item[key] for item in items]) for key in ("clip", "ef", "site"))  # type: ignore[return-value]


@torch.no_grad()
def measure_ef(regressor: nn.Module, clips: Tensor, *, batch_size: int = 32) -> Tensor:
    """EF (N,) percent that ``regressor`` reads from pixel clips (N, 1, T, H, W)."""
    regressor.eval()
    return torch.cat([regressor(chunk) for chunk in clips.split(batch_size)])


def ef_regression(regressor: nn.Module, sites: Sequence[SiteData], *, frames: int, fps: float) -> Regression:
    """The regressor on real held-out clips."""
    clips, ef, _ = first_clips(sites, frames=frames, fps=fps)
    return regression(ef.numpy(), measure_ef(regressor, clips).numpy())


@torch.no_grad()
def vae_ef_gap(vae: AdversarialVAE, regressor: nn.Module, sites: Sequence[SiteData], *, frames: int,
               fps: float) -> dict[str, float]:
    """EF MAE on original clips vs on their VAE reconstructions (and the reconstructions' pixel L1)."""
    clips, ef, _ = first_clips(sites, frames=frames, fps=fps)
    vae.eval()
    recon = torch.cat([vae.decode_latent(vae.encode_latent(c)).clamp(-1, 1) for c in clips.split(8)])
    on_real, on_recon = measure_ef(regressor, clips), measure_ef(regressor, recon)
    return {
        "mae_original": float((on_real - ef).abs().mean()),
        "mae_reconstructed": float((on_recon - ef).abs().mean()),
        "mae_between": float((on_recon - on_real).abs().mean()),
        "pixel_l1": float((recon - clips).abs().mean()),
    }


def frames_of(latent_sites: Sequence[SiteData], *, every: int) -> tuple[Tensor, Tensor]:
    """Every ``every``-th latent frame of every video (N, C, h, w) and its patient index (N,)."""
    frames, patients = [], []
    for site in latent_sites:
        for record, video in zip(site.records, site.videos, strict=True):
            picked = torch.from_numpy(video[::every])
            frames.append(picked)
            patients += [site.patient_index[record.patient_id]] * len(picked)
    return torch.cat(frames), torch.tensor(patients)


def reid_auc(encoder: nn.Module, latent_sites: Sequence[SiteData], *, every: int = 8) -> float:
    """Same- vs different-patient verification AUC on the given (held-out) sites' latent frames."""
    frames, patients = frames_of(latent_sites, every=every)
    return verification_auc(embed(encoder, frames), patients)


def image_flow_fd(flow: nn.Module, encoder: nn.Module, train: Sequence[SiteData], held_out: Sequence[SiteData],
                  *, n: int, steps: int, method: Method, target: Target) -> dict[str, float]:
    """Fréchet distance to held-out real latents in re-id space: generated, real-train floor, Gaussian baseline."""
    real, _ = frames_of(held_out, every=4)
    floor, _ = frames_of(train, every=4)
    generated = sample_latent_frames(flow, n, shape=real.shape[1:], steps=steps, method=method, target=target)
    reference = embed(encoder, real).numpy()
    fd = {
        "generated": frechet_distance(embed(encoder, generated).numpy(), reference),
        "real_floor": frechet_distance(embed(encoder, floor[torch.randperm(len(floor))[:n]]).numpy(), reference),
        "gaussian_baseline": frechet_distance(embed(encoder, torch.randn(n, *real.shape[1:])).numpy(), reference),
    }
    fd["baseline_over_generated"] = fd["gaussian_baseline"] / max(fd["generated"], 1e-12)
    return fd


def video_flow_ef(video_flow: nn.Module, vae: AdversarialVAE, regressor: nn.Module,
                  held_out: Sequence[SiteData], *, n: int, frames: int, steps: int, method: Method, target: Target,
                  guidance: float, ef_range: tuple[float, float] = (20.0, 75.0), seed: int = 0
                  ) -> tuple[Regression, np.ndarray, np.ndarray]:
    """Animate held-out first latent frames at requested EFs; R² of regressor-measured EF vs requested.

    Returns the regression summary and the (requested, measured) EF arrays for plotting.
    """
    generator = torch.Generator().manual_seed(seed)
    firsts = torch.stack([torch.from_numpy(video[0]) for site in held_out for video in site.videos])
    firsts = firsts[torch.randint(len(firsts), (n,), generator=generator)]
    requested = ef_range[0] + (ef_range[1] - ef_range[0]) * torch.rand(n, generator=generator)
    latents = animate_frames(video_flow, firsts, requested, frames=frames, window=frames, steps=steps,
                             method=method, target=target, guidance=guidance, generator=generator)
    measured = measure_ef(regressor, decode_clips(vae, latents))
    return regression(requested.numpy(), measured.numpy()), requested.numpy(), measured.numpy()
