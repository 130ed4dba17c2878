"""Generation: latent frames from the image flow, animated by the video flow at requested EFs, decoded to pixels.

The order is the paper's: sample latent frames (new "patients"), screen them with the re-id model (the
pipeline's screen asks every site's audit index), animate the survivors, decode. `generate_videos` is the one
recipe: the pipeline, ``echoflow sample`` and the evaluation call it; each step is also a function of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from echoflow.config import threads_of, threads_while
from echoflow.data.echonet import VideoRecord, write_avi, write_filelist
from echoflow.data.intensity import to_uint8
from echoflow.errors import EchoFlowError
from echoflow.models.flow import Method, Target, sample
from echoflow.models.image_flow import conditions_on_ef
from echoflow.models.vae import AdversarialVAE
from echoflow.models.video_flow import LatentVideoFlow, animate
from echoflow.progress import progress_bar
from echoflow.study.models import Models


@torch.no_grad()
def sample_latent_frames(flow: nn.Module, n: int, *, shape: Sequence[int], steps: int, method: Method,
                         target: Target, batch_size: int = 64, generator: torch.Generator | None = None,
                         ef: Tensor | None = None) -> Tensor:
    """``n`` latent frames (n, C, h, w) from the latent image flow (progress: ODE steps of all batches).

    ``ef`` (n,) percent: each frame drawn for that EF (an EF-conditioned image flow only).
    """
    flow.eval()
    starts = range(0, n, batch_size)
    cond: list[dict[str, Any]] = [{} if ef is None else {"ef": ef[i : i + batch_size]} for i in starts]
    with progress_bar(f"sample {n} latent frames (ODE steps)", total=len(starts) * steps) as advance:
        chunks = [sample(flow, torch.randn(min(batch_size, n - i), *shape, generator=generator), steps=steps,
                         method=method, target=target, advance=advance, **c)
                  for i, c in zip(starts, cond, strict=True)]
    return torch.cat(chunks)


@torch.no_grad()
def animate_frames(video_flow: nn.Module, first: Tensor, ef: Tensor, *, frames: int, window: int, steps: int,
                   method: Method, target: Target, guidance: float, batch_size: int = 16,
                   generator: torch.Generator | None = None) -> Tensor:
    """Latent clips (N, C, frames, h, w) starting from latent frames ``first`` (N, C, h, w) at ``ef`` (N,) percent.

    Progress counts clip frames, advanced window by window.
    """
    if not isinstance(video_flow, LatentVideoFlow):
        raise EchoFlowError(f"video_flow: expected a LatentVideoFlow, got {type(video_flow).__name__}")
    video_flow.eval()
    with progress_bar(f"animate {len(first)} clips (frames)", total=len(first) * frames) as advance:
        return torch.cat([
            animate(video_flow, f, e, frames=frames, window=window, steps=steps, method=method, target=target,
                    guidance=guidance, generator=generator, advance=advance)
            for f, e in zip(first.split(batch_size), ef.split(batch_size), strict=True)
        ])


@torch.no_grad()
def decode_clips(vae: AdversarialVAE, latents: Tensor, *, batch_size: int = 8) -> Tensor:
    """Scaled latent clips (N, C, T, h, w) -> pixel clips (N, 1, T, H, W) clamped to [-1, 1]."""
    vae.eval()
    decoded = []
    with progress_bar(f"decode {len(latents)} clips", total=len(latents)) as advance:
        for chunk in latents.split(batch_size):
            decoded.append(vae.decode_latent(chunk).clamp(-1, 1))
            advance(len(chunk))
    return torch.cat(decoded)


@dataclass(frozen=True)
class Sampling:
    """How to sample.

    Attributes:
        steps, method: the ODE solver. image_target, video_target: each flow's training target.
        guidance: classifier-free guidance scale. window: the clip length the video flow was trained on.
        frames: frames per generated video. size: frame size in pixels. threads: torch threads while generating.
    """

    steps: int
    method: Method
    image_target: Target
    video_target: Target
    guidance: float
    window: int
    frames: int
    size: int
    threads: int

    @classmethod
    def of(cls, cfg: DictConfig, *, frames: int) -> Sampling:
        """The run's ``train.sampling`` settings for videos of ``frames`` frames."""
        s = cfg.train.sampling
        return cls(steps=s.steps, method=s.method, image_target=cfg.train.image_flow.loss.target,
                   video_target=cfg.train.video_flow.loss.target, guidance=s.guidance, window=cfg.data.clip_frames,
                   frames=frames, size=cfg.data.size, threads=threads_of(cfg, "generation_threads"))


@dataclass(frozen=True)
class Generated:
    """Generated videos (N, T, H, W) uint8 and their requested EFs (N,); latent frames drawn and screened out."""

    videos: np.ndarray
    ef: np.ndarray
    drawn: int
    screened_out: int


def generate_videos(models: Models, n: int, requested_ef: Callable[[int, torch.Generator], Tensor],
                    sampling: Sampling, *, generator: torch.Generator, oversample: float = 1.0,
                    screen: Callable[[Tensor], np.ndarray] | None = None) -> Generated:
    """Up to ``n`` videos: the generation recipe of the pipeline, ``echoflow sample`` and the evaluation.

    Samples ``oversample`` × n latent frames, keeps those ``screen`` passes (all without one), animates the first
    ``n`` survivors at ``requested_ef(count, generator)`` EFs, and decodes them. An EF-conditioned image flow
    draws each frame for its EF: the EFs are requested first, one per drawn frame.
    """
    vae, drawn = models.vae, round(n * oversample)
    latent = sampling.size // vae.downsample
    coupled = conditions_on_ef(models.image_flow)
    drawn_ef = requested_ef(drawn, generator) if coupled else None
    with threads_while(sampling.threads):
        frames = sample_latent_frames(models.image_flow, drawn, shape=(vae.latent_channels, latent, latent),
                                      steps=sampling.steps, method=sampling.method, target=sampling.image_target,
                                      generator=generator, ef=drawn_ef)
    # screening runs outside the block: the audit's sites search side by side, one thread each
    keep = torch.from_numpy(np.ones(drawn, dtype=bool) if screen is None else screen(frames))
    survivors = frames[keep][:n]
    ef = drawn_ef[keep][:n] if drawn_ef is not None else requested_ef(len(survivors), generator)
    with threads_while(sampling.threads):
        latents = animate_frames(models.video_flow, survivors, ef, frames=sampling.frames, window=sampling.window,
                                 steps=sampling.steps, method=sampling.method, target=sampling.video_target,
                                 guidance=sampling.guidance, generator=generator)
        videos = to_uint8(decode_clips(vae, latents)[:, 0])
    return Generated(videos, ef.numpy(), drawn, int((~keep).sum()))


def write_synthetic(out: Path, videos: np.ndarray, ef: np.ndarray, *, fps: float, prefix: str = "SYN",
                    site: str = "synthetic") -> list[VideoRecord]:
    """Write videos (N, T, H, W) uint8 in the EchoNet layout, labelled with their requested EF.

    Each video is its own synthetic patient; volumes are unknown (blank); splits are TRAIN/VAL 90/10 so an EF
    regressor can train on them. Returns the records written to ``out/FileList.csv``.
    """
    records = []
    for i, (video, value) in enumerate(zip(videos, ef, strict=True)):
        name = f"{prefix}{i:05d}"
        path = out / "Videos" / f"{name}.avi"
        write_avi(path, video, fps)
        records.append(VideoRecord(name, path, float(value), float("nan"), float("nan"), fps, len(video),
                                   video.shape[1], video.shape[2], "VAL" if i % 10 == 9 else "TRAIN", name, site))
    write_filelist(out, records)
    return records
