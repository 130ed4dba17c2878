"""Re-id embeddings for the audit: generated samples and each site's real TRAIN frames, with provenance.

Every sample the audit sees takes one path: pixel frames (N, 1, H, W) in [-1, 1] -> the VAE's scaled latent means
(N, C, h, w) -> the re-id encoder -> (N, D) embeddings. Generated latent frames (e.g. straight from the image
flow) skip the VAE and enter at `embed`. Which frames of a video are audited is `pick_frames`' choice: every
frame, every k-th, or only the first (the paper's option for real data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from echoflow.data.intensity import to_unit
from echoflow.errors import EchoFlowError
from echoflow.models.vae import AdversarialVAE
from echoflow.progress import progress_bar


@torch.no_grad()
def embed(encoder: nn.Module, latents: Tensor, *, batch_size: int = 256) -> Tensor:
    """Re-id embeddings (N, D) of latent frames (N, C, h, w)."""
    encoder.eval()
    return torch.cat([encoder(chunk) for chunk in latents.split(batch_size)])


def frame_batch(frames: np.ndarray) -> np.ndarray:
    """uint8 pixel frames (N, H, W) -> float32 model input (N, 1, H, W) in [-1, 1]."""
    return to_unit(frames).numpy()[:, None]


@torch.no_grad()
def embed_pixels(vae: AdversarialVAE, encoder: nn.Module, frames: np.ndarray, *, batch_size: int = 128,
                 quiet: bool = False) -> np.ndarray:
    """Re-id embeddings of pixel frames: VAE latent means, then the re-id encoder.

    Args:
        vae: trained VAE (its ``latent_scale`` is applied, as in training).
        encoder: trained re-id encoder.
        frames: (N, 1, H, W) float in [-1, 1].
        batch_size: frames per forward pass.
        quiet: no progress bar (e.g. when the caller shows one).

    Returns:
        (N, D) float32 embeddings.
    """
    if frames.ndim != 4 or frames.shape[1] != 1:
        raise EchoFlowError(f"audit frames: expected (N, 1, H, W), got shape {frames.shape}")
    vae.eval()
    x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
    latents = []
    with progress_bar(f"embed {len(x)} frames", total=len(x), quiet=quiet) as advance:
        for chunk in x.split(batch_size):  # the VAE is the slow part; the re-id encoder is small
            latents.append(vae.encode_latent(chunk))
            advance(len(chunk))
    return embed(encoder, torch.cat(latents), batch_size=batch_size).numpy().astype(np.float32)


@dataclass(frozen=True)
class FrameRefs:
    """Which video frame each embedding row is.

    Attributes:
        videos: video file names (EchoNet ``FileName``), in the order the videos were given.
        video: (N,) int64 index into ``videos``.
        frame: (N,) int64 frame index within that video (0-based, in the file's own frame rate).
    """

    videos: tuple[str, ...]
    video: np.ndarray
    frame: np.ndarray

    def name(self, row: int) -> tuple[str, int]:
        """(video file name, frame) of embedding row ``row``."""
        return self.videos[int(self.video[row])], int(self.frame[row])


def pick_frames(lengths: Sequence[int], *, every: int = 1, first_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The frames to audit in videos of the given lengths (frames 0, k, 2k, ... or only frame 0).

    Returns:
        (video index (N,), frame index (N,)), both int64, video-major.
    """
    if every < 1:
        raise EchoFlowError(f"audit.every: expected ≥ 1, got {every}")
    picks = [np.arange(0, 1 if first_only else n, every, dtype=np.int64) for n in lengths]
    video = np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(picks)] or [np.zeros(0, np.int64)])
    frame = np.concatenate(picks or [np.zeros(0, np.int64)])
    return video, frame


def video_frames(videos: Sequence[np.ndarray], video: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """The picked frames of uint8 videos (T, H, W) as model input (N, 1, H, W) in [-1, 1]."""
    return frame_batch(np.stack([videos[v][f] for v, f in zip(video, frame, strict=True)]))


@dataclass(frozen=True)
class Embedded:
    """Embeddings with their provenance.

    Attributes:
        vectors: (N, D) float32 re-id embeddings; row i is local sample id i of a site index built from them.
        refs: the video and frame of each row.
    """

    vectors: np.ndarray
    refs: FrameRefs


def embed_videos(
    vae: AdversarialVAE, encoder: nn.Module, videos: Sequence[np.ndarray], names: Sequence[str], *,
    every: int = 1, first_only: bool = False, batch_size: int = 128, description: str = "embed videos",
) -> Embedded:
    """Embed the picked frames of pixel videos, one video at a time (memory stays one video's worth).

    Args:
        vae: trained VAE.
        encoder: trained re-id encoder.
        videos: (T, H, W) uint8 videos; T may differ.
        names: their file names, aligned with ``videos``.
        every: audit every ``every``-th frame (1 = all frames).
        first_only: only each video's first frame.
        batch_size: frames per forward pass.
        description: of the progress bar (counting videos).
    """
    if len(videos) != len(names) or not videos:
        raise EchoFlowError(f"audit videos: {len(videos)} videos but {len(names)} names (need ≥ 1 of each)")
    video, frame = pick_frames([len(v) for v in videos], every=every, first_only=first_only)
    vectors = []
    with progress_bar(description, total=len(videos)) as advance:
        for i in range(len(videos)):
            vectors.append(embed_pixels(vae, encoder, video_frames(videos, video[video == i], frame[video == i]),
                                        batch_size=batch_size, quiet=True))
            advance(1)
    return Embedded(np.concatenate(vectors), FrameRefs(tuple(names), video, frame))


@dataclass(frozen=True)
class RealSite:
    """One site's real data as the audit holds it (at the site in federated mode).

    Attributes:
        train: embeddings of its TRAIN frames (row = local sample id) and their video/frame.
        heldout: (H, D) embeddings of its VAL + TEST frames (calibration).
        videos: its TRAIN pixel videos (T, H, W) uint8, aligned with ``train.refs.videos`` (canaries, thumbnails).
    """

    train: Embedded
    heldout: np.ndarray
    videos: list[np.ndarray]
