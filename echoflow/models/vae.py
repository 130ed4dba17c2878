"""Adversarial VAE: the latent space of echo frames that every EchoFlow generator works in.

A convolutional encoder maps a frame (B, 1, H, W) in [-1, 1] to a diagonal Gaussian over latents
(B, latent_channels, H / f, W / f) with f = 2 ** (len(channel_multipliers) - 1); the decoder maps latents back.
A PatchGAN discriminator sharpens the decoder (VQGAN / latent-diffusion autoencoder recipe).

How a training step combines the losses (one generator step, then one discriminator step)::

    recon, mean, logvar = vae(x)                    # recon from a posterior sample
    rec = reconstruction_loss(recon, x)
    g = generator_loss(disc(recon))
    w = adaptive_weight(rec, g, vae.last_layer_weight) * adversarial_factor(step, start=warmup)
    vae_objective = rec + kl_weight * kl_loss(mean, logvar) + disc_weight * w * g
    disc_objective = adversarial_factor(step, start=warmup) * discriminator_loss(disc(x), disc(recon.detach()))

``adaptive_weight`` differentiates through the decoder; under Opacus call it between
``GradSampleModule.disable_hooks()`` and ``enable_hooks()`` so it leaves no per-sample gradients behind.
The discriminator sees real frames, so under DP-SGD it must be private too.

``latent_scale`` (1 / std of latent means, measured once on the training set by ``measure_latent_scale``) is stored
with the VAE; ``encode_latent`` / ``decode_latent`` apply it, so flow models see latents of unit scale.

``ResBlock`` here is the unconditional residual block (the re-id encoder reuses it); ``blocks.ResBlock`` is the
flow networks' variant that adds a conditioning embedding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echoflow.errors import EchoFlowError
from echoflow.models.blocks import ResBlock, group_norm


@dataclass(frozen=True)
class DiagonalGaussian:
    """Posterior q(z | x) = N(mean, exp(logvar)); both (B, C, h, w)."""

    mean: Tensor
    logvar: Tensor

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A reparameterised sample, (B, C, h, w); differentiable in mean and logvar."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * eps

    def mode(self) -> Tensor:
        """The posterior mean, (B, C, h, w)."""
        return self.mean


def _levels(base_channels: int, channel_multipliers: Sequence[int]) -> list[int]:
    if not channel_multipliers or min(channel_multipliers) < 1 or base_channels < 1:
        raise EchoFlowError(
            f"model.vae: need base_channels >= 1 and channel multipliers >= 1, got {base_channels}, "
            f"{tuple(channel_multipliers)}"
        )
    return [base_channels * m for m in channel_multipliers]


class _Encoder(nn.Module):
    def __init__(self, channels: list[int], res_blocks: int, out_channels: int, patch_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.PixelUnshuffle(patch_size), nn.Conv2d(patch_size**2, channels[0], 3, padding=1)]
        prev = channels[0]
        for i, ch in enumerate(channels):
            for _ in range(res_blocks):
                layers.append(ResBlock(prev, ch))
                prev = ch
            if i < len(channels) - 1:
                layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        layers += [ResBlock(prev, prev), group_norm(prev), nn.SiLU(), nn.Conv2d(prev, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _Decoder(nn.Module):
    def __init__(self, channels: list[int], res_blocks: int, latent_channels: int, patch_size: int) -> None:
        super().__init__()
        prev = channels[-1]
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, prev, 3, padding=1), ResBlock(prev, prev)]
        for i, ch in reversed(list(enumerate(channels))):
            for _ in range(res_blocks):
                layers.append(ResBlock(prev, ch))
                prev = ch
            if i > 0:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        layers += [group_norm(prev), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(prev, patch_size**2, 3, padding=1)
        self.unpatch = nn.PixelShuffle(patch_size)

    def forward(self, z: Tensor) -> Tensor:
        return self.unpatch(self.conv_out(self.net(z)))


class AdversarialVAE(nn.Module):
    """Convolutional VAE for grayscale echo frames.

    Args:
        base_channels: channels of the first level (demo 24: ~0.4 s per CPU step on 32 frames; paper 128).
        channel_multipliers: channels per level relative to ``base_channels``; each level after the first halves
            the resolution.
        res_blocks: residual blocks per level.
        latent_channels: latent channels (4 in the paper).
        patch_size: pixel-(un)shuffle factor at the input and output, so no convolution runs at full resolution
            (the demo's CPU budget); 1 disables it. The total downsample factor is
            ``patch_size * 2 ** (len(channel_multipliers) - 1)``: demo (1, 2) with 2 -> 4 (64 -> 16);
            paper-like (1, 2, 4, 4) with 1 -> 8 (112 -> 14).
    """

    latent_scale: Tensor

    def __init__(
        self,
        *,
        base_channels: int = 24,
        channel_multipliers: Sequence[int] = (1, 2),
        res_blocks: int = 1,
        latent_channels: int = 4,
        patch_size: int = 2,
    ) -> None:
        super().__init__()
        channels = _levels(base_channels, channel_multipliers)
        if patch_size < 1:
            raise EchoFlowError(f"model.vae.patch_size: must be >= 1, got {patch_size}")
        self.latent_channels = latent_channels
        self.downsample = patch_size * 2 ** (len(channels) - 1)
        self.encoder = _Encoder(channels, res_blocks, 2 * latent_channels, patch_size)
        self.decoder = _Decoder(channels, res_blocks, latent_channels, patch_size)
        self.register_buffer("latent_scale", torch.ones(()))

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Frames (B, 1, H, W) in [-1, 1], H and W divisible by ``downsample`` -> posterior over (B, C, h, w)."""
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise EchoFlowError(
                f"frames: expected (B, 1, H, W) with H, W divisible by {self.downsample}, got {tuple(x.shape)}"
            )
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents (B, C, h, w) -> frames (B, 1, h * downsample, w * downsample), roughly [-1, 1]."""
        return self.decoder(z)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Frames (B, 1, H, W) -> (reconstruction from a posterior sample, mean, logvar)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample()), posterior.mean, posterior.logvar

    @property
    def last_layer_weight(self) -> Tensor:
        """The decoder's output convolution weight, where ``adaptive_weight`` compares gradients."""
        return self.decoder.conv_out.weight

    def encode_latent(self, x: Tensor) -> Tensor:
        """Frames (B, 1, H, W) or clips (B, 1, T, H, W) -> scaled latent means (B, C, h, w) / (B, C, T, h, w)."""
        if x.ndim == 5:
            b, _, t, h, w = x.shape
            z = self.encode(x.transpose(1, 2).reshape(b * t, 1, h, w)).mode()
            return self.latent_scale * z.reshape(b, t, *z.shape[1:]).transpose(1, 2)
        return self.latent_scale * self.encode(x).mode()

    def decode_latent(self, z: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) or (B, C, T, h, w) -> frames (B, 1, H, W) or clips (B, 1, T, H, W)."""
        if z.ndim == 5:
            b, c, t, h, w = z.shape
            x = self.decode(z.transpose(1, 2).reshape(b * t, c, h, w) / self.latent_scale)
            return x.reshape(b, t, *x.shape[1:]).transpose(1, 2)
        return self.decode(z / self.latent_scale)


@torch.no_grad()
def measure_latent_scale(vae: AdversarialVAE, frames: Tensor | Iterable[Tensor], *, batch_size: int = 64) -> float:
    """Set ``vae.latent_scale`` to 1 / std of the latent means over ``frames`` and return it.

    Args:
        vae: a trained VAE; its mode (train/eval) is restored afterwards.
        frames: (N, 1, H, W) in [-1, 1], or an iterable of such batches (e.g. a DataLoader of frame tensors).
        batch_size: batch size used when ``frames`` is one tensor.
    """
    batches = frames.split(batch_size) if isinstance(frames, Tensor) else frames
    was_training = vae.training
    vae.eval()
    total, total_sq, count = 0.0, 0.0, 0
    for x in batches:
        z = vae.encode(x.to(vae.latent_scale.device)).mode().double()
        total, total_sq, count = total + z.sum().item(), total_sq + z.square().sum().item(), count + z.numel()
    vae.train(was_training)
    if count < 2:
        raise EchoFlowError("frames: need at least one frame to measure the latent scale")
    std = math.sqrt(max(total_sq / count - (total / count) ** 2, 0.0) * count / (count - 1))
    if std == 0.0:
        raise EchoFlowError("frames: latent means are constant; cannot measure the latent scale")
    vae.latent_scale.fill_(1.0 / std)
    return 1.0 / std


class PatchDiscriminator(nn.Module):
    """PatchGAN: frames (B, 1, H, W) -> real/fake logits per overlapping patch, (B, 1, h', w').

    Args:
        base_channels: channels of the first layer (demo 16; taming-transformers 64).
        layers: stride-2 layers; each halves resolution and widens the receptive field (64x64 -> 6x6 at 3).
    """

    def __init__(self, *, base_channels: int = 16, layers: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(1, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = base_channels
        for i in range(1, layers + 1):
            out = base_channels * 2 ** min(i, 3)
            mods += [nn.Conv2d(ch, out, 4, stride=2 if i < layers else 1, padding=1), group_norm(out)]
            mods.append(nn.LeakyReLU(0.2))
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        """Frames (B, 1, H, W) in [-1, 1] -> patch logits (B, 1, h', w'); positive means 'real'."""
        return self.net(x)


def reconstruction_loss(recon: Tensor, x: Tensor) -> Tensor:
    """Mean absolute error (L1) between reconstruction and frames, both (B, 1, H, W); a scalar."""
    return (recon - x).abs().mean()


def kl_loss(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), averaged over batch and latent elements; a scalar.

    Being a per-element mean like ``reconstruction_loss``, typical weights are 1e-4 to 1e-6.
    """
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Hinge loss for the discriminator: 0.5 * (E[relu(1 - D(real))] + E[relu(1 + D(fake))]); a scalar."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def generator_loss(fake_logits: Tensor) -> Tensor:
    """Adversarial loss for the decoder: -E[D(reconstruction)]; a scalar."""
    return -fake_logits.mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer_weight: Tensor, *, max_weight: float = 1e4) -> Tensor:
    """VQGAN's balance: ||grad rec|| / ||grad g|| at the decoder's last layer, clamped to [0, max_weight].

    Both losses must still have their graphs (they are retained). Returns a detached scalar.
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def adversarial_factor(step: int, *, start: int) -> float:
    """1.0 once ``step >= start`` (the adversarial term switches on after warm-up), else 0.0."""
    return 1.0 if step >= start else 0.0
