"""LV segmenter: an EF meter that is not the judge.

A small U-Net trained on the phantom's LV cavity masks (``LVMasks/*.npz``) reads EF from any pixel clip, real
or generated, by the phantom's own definition: the area–length volume V = 8A²/(3πL) per frame (A the cavity
area, L its long axis), EF = 100 · (1 − min V / max V) over the clip (end-systole and end-diastole are the
smallest and largest cavities). The area is the sum of the soft mask (partial pixels count), the long axis the
mask's extent along its principal axis, so EF is read to a fraction of a pixel of boundary. It shares nothing
with the EF regressor, so it can judge whether generated videos carry the EF they were asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echoflow.errors import EchoFlowError
from echoflow.models.blocks import Downsample, ResBlock, Upsample, group_norm


class LVSegmenter(nn.Module):
    """U-Net from a frame (B, 1, H, W) in [-1, 1] to LV-cavity logits (B, 1, H, W); ~0.15M parameters.

    ``patch`` x ``patch`` pixels are folded into channels first and unfolded at the end (4x less work at full
    resolution; H, W must divide by it), as the VAE does.
    """

    def __init__(self, *, channels: Sequence[int] = (16, 32, 64), patch: int = 2) -> None:
        super().__init__()
        self.patch = patch
        self.inp = nn.Conv2d(patch * patch, channels[0], 3, padding=1)
        self.down = nn.ModuleList([ResBlock(a, b) for a, b in zip([channels[0], *channels[:-1]], channels,
                                                                   strict=True)])
        self.pool = nn.ModuleList([Downsample(c, video=False) for c in channels[:-1]])
        self.lift = nn.ModuleList([Upsample(channels[i + 1], channels[i], video=False)
                                   for i in range(len(channels) - 1)])
        self.up = nn.ModuleList([ResBlock(2 * c, c) for c in channels[:-1]])
        self.out = nn.Sequential(group_norm(channels[0]), nn.SiLU(),
                                 nn.Conv2d(channels[0], patch * patch, 3, padding=1))

    def forward(self, frames: Tensor) -> Tensor:
        """frames: (B, 1, H, W) in [-1, 1] -> (B, 1, H, W) logits of the LV cavity."""
        if frames.shape[-1] % self.patch or frames.shape[-2] % self.patch:
            raise EchoFlowError(f"LVSegmenter: frame size {tuple(frames.shape[-2:])} not divisible by {self.patch}")
        x, skips = self.inp(F.pixel_unshuffle(frames, self.patch)), []
        for level, block in enumerate(self.down):
            x = block(x)
            if level < len(self.pool):
                skips.append(x)
                x = self.pool[level](x)
        for level in reversed(range(len(self.up))):
            skip = skips[level]
            x = self.up[level](torch.cat([self.lift[level](x, skip.shape[-2:]), skip], dim=1))
        return F.pixel_shuffle(self.out(x), self.patch)

    @torch.no_grad()
    def masks(self, clips: Tensor, *, batch: int = 256) -> Tensor:
        """Soft LV masks of pixel clips (B, 1, T, H, W) in [-1, 1] -> (B, T, H, W) probabilities."""
        b, _, t, h, w = clips.shape
        frames = clips.transpose(1, 2).reshape(b * t, 1, h, w)
        probs = torch.cat([torch.sigmoid(self(chunk)) for chunk in frames.split(batch)])
        return probs.view(b, t, h, w)

    def ef(self, clips: Tensor) -> Tensor:
        """EF, percent, of pixel clips (B, 1, T, H, W) in [-1, 1] by area–length over each clip -> (B,)."""
        if clips.dim() != 5 or clips.shape[1] != 1:
            raise EchoFlowError(f"LVSegmenter.ef: expected clips (B, 1, T, H, W), got {tuple(clips.shape)}")
        return ef_from_volumes(area_length_volumes(self.masks(clips)))


def area_length_volumes(masks: Tensor) -> Tensor:
    """Area–length volume 8A²/(3πL) per frame, in pixel³, of soft or hard masks (..., H, W) -> (...).

    A is the sum of the mask; L the extent of the mask (pixels over 0.5) along its principal axis plus one
    pixel (both chord ends), the long axis of an LV cavity. A frame with no cavity has volume 0.
    """
    lead, (h, w) = masks.shape[:-2], masks.shape[-2:]
    flat = masks.reshape(-1, h, w).float()
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    coords = torch.stack([xs.flatten(), ys.flatten()], dim=1)  # (HW, 2)
    volumes = []
    for mask in flat:
        weights = mask.flatten()
        area = float(weights.sum())
        if area < 1.0:
            volumes.append(0.0)
            continue
        centre = (weights[:, None] * coords).sum(0) / area
        offsets = coords - centre
        cov = (weights[:, None] * offsets).T @ offsets / area
        axis = torch.linalg.eigh(cov).eigenvectors[:, -1]
        inside = offsets[weights > 0.5] @ axis
        length = float(inside.max() - inside.min()) + 1.0 if inside.numel() else 1.0
        volumes.append(8.0 * area**2 / (3.0 * math.pi * length))
    return torch.tensor(volumes).view(lead)


def ef_from_volumes(volumes: Tensor) -> Tensor:
    """EF = 100 · (1 − min V / max V) over the last axis: (..., T) -> (...); 0 where no frame has a cavity."""
    top = volumes.max(dim=-1).values
    return torch.where(top > 0, 100.0 * (1.0 - volumes.min(dim=-1).values / top.clamp_min(1e-9)), 0.0)


def segmentation_loss(logits: Tensor, masks: Tensor) -> Tensor:
    """Binary cross-entropy plus soft Dice (1 − 2|P∩M|/(|P|+|M|)) of logits and masks, both (B, 1, H, W)."""
    probs = torch.sigmoid(logits)
    dice = 1 - (2 * (probs * masks).sum((1, 2, 3)) + 1) / (probs.sum((1, 2, 3)) + masks.sum((1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, masks) + dice.mean()


def augment_frames(frames: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Random gain, Gaussian blur (σ up to 1.5 px) and noise of frames (B, 1, H, W) in [-1, 1].

    Generated and VAE-decoded frames are smoother and differently exposed than real ones; the meter must read
    them alike. Geometry is left alone, so the masks stay valid.
    """
    b = frames.shape[0]
    rand = torch.rand(b, 3, generator=generator)
    gain = (0.7 + 0.6 * rand[:, 0]).view(b, 1, 1, 1)
    out = ((frames + 1) * gain - 1).clamp(-1, 1)
    sigma = 1.5 * rand[:, 1]
    radius = torch.arange(-3, 4, dtype=torch.float32)
    kernels = torch.exp(-(radius[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)  # (B, 7)
    padded = F.pad(out, (3, 3, 3, 3), mode="replicate").transpose(0, 1)  # (1, B, H+6, W+6)
    out = F.conv2d(padded, kernels.view(b, 1, 7, 1), groups=b)
    out = F.conv2d(out, kernels.view(b, 1, 1, 7), groups=b).transpose(0, 1)
    noise = 0.1 * rand[:, 2].view(b, 1, 1, 1) * torch.randn(out.shape, generator=generator)
    return (out + noise).clamp(-1, 1)
