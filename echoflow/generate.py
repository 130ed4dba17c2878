"""Generation: latent frames from the image flow, animated by the video flow at requested EFs, decoded to pixels.

The order is the paper's: sample latent frames (new "patients"), screen them with the re-id model (in the
audit), animate the survivors, decode. Each step is a function so the pipeline can put the audit between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from echoflow.data.echonet import VideoRecord, write_avi, write_filelist
from echoflow.errors import EchoFlowError
from echoflow.models.flow import Method, Target, sample
from echoflow.models.vae import AdversarialVAE
from echoflow.models.video_flow import LatentVideoFlow, animate
from echoflow.progress import progress_bar


@torch.no_grad()
def sample_latent_frames(flow: nn.Module, n: int, *, shape: Sequence[int], steps: int, method: Method,
                         target: Target, batch_size: int = 64, generator: torch.Generator | None = None) -> Tensor:
    """``n`` latent frames (n, C, h, w) from the latent image flow (progress: ODE steps of all batches)."""
    flow.eval()
    starts = range(0, n, batch_size)
    with progress_bar(f"sample {n} latent frames (ODE steps)", total=len(starts) * steps) as advance:
        chunks = [sample(flow, torch.randn(min(batch_size, n - i), *shape, generator=generator), steps=steps,
                         method=method, target=target, advance=advance) for i in starts]
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


def to_uint8(clips: Tensor) -> np.ndarray:
    """Pixel clips (N, 1, T, H, W) in [-1, 1] -> videos (N, T, H, W) uint8."""
    return ((clips[:, 0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


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
