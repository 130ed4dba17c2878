"""Building blocks shared by the latent flow networks, for frames (B, C, H, W) and clips (B, C, T, H, W).

Every block is Opacus-compatible (sites train under DP-SGD): GroupNorm instead of BatchNorm, learned
tensors only inside ``nn.Linear`` / ``nn.Conv*`` / ``nn.Embedding`` / ``nn.GroupNorm``, and attention built
from ``nn.Linear`` + ``F.scaled_dot_product_attention`` with the batch dimension kept first, so Opacus hooks
see one input row per sample. ``video=True`` switches a block to clips: (2+1)D convolutions (spatial
(1, 3, 3) then temporal (3, 1, 1), as in R(2+1)D) and attention over time at each spatial position.
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoidal_embedding(x: Tensor, dim: int, *, max_period: float = 10_000.0) -> Tensor:
    """Fourier features of a scalar per sample.

    Args:
        x: (B,) values in [0, 1] (flow time t, or EF / 100).
        dim: even number of features.
        max_period: longest period, in units of x / 1000.

    Returns:
        (B, dim) cosines then sines.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device) / half)
    args = 1000.0 * x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ScalarEmbedding(nn.Module):
    """Fourier features of a scalar in [0, 1] followed by a two-layer MLP: (B,) -> (B, dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        """Embed x: (B,) in [0, 1] -> (B, dim)."""
        return self.mlp(sinusoidal_embedding(x, self.dim))


EFEmbeddingKind = Literal["smooth", "fourier"]
EF_PERIODS = (20.0, 40.0, 80.0, 160.0)
"""Periods, in EF points, of the smooth EF features: nearby EFs get nearby features (EF 50 vs 51 differ by
≤ 0.31 per sine/cosine pair, 50 vs 60 by up to 2), so the network learns EF as a dose, not a per-video key."""


def smooth_ef_features(ef: Tensor) -> Tensor:
    """Features of EF that vary slowly with it.

    Args:
        ef: (B,) ejection fraction, percent 0-100.

    Returns:
        (B, 1 + 2·len(EF_PERIODS)): the linear coordinate (EF − 50) / 20, then cosines and sines of
        2π·EF / period for each period in ``EF_PERIODS``.
    """
    ef = ef.float()
    periods = torch.tensor(EF_PERIODS, device=ef.device)
    args = 2 * math.pi * ef[:, None] / periods[None]
    return torch.cat([((ef - 50.0) / 20.0)[:, None], torch.cos(args), torch.sin(args)], dim=-1)


class EFEmbedding(nn.Module):
    """EF (percent) -> (B, dim) through features and a two-layer MLP.

    ``kind="smooth"`` (default): :func:`smooth_ef_features` (a linear coordinate plus periods of 20-160 points).
    ``kind="fourier"``: the timestep embedding of EF / 100 (:class:`ScalarEmbedding`); its shortest period is
    0.63 EF points, so EF 50 and 51 embed about as far apart as 50 and 60 (kept to read older checkpoints).
    """

    def __init__(self, dim: int, *, kind: EFEmbeddingKind = "smooth") -> None:
        super().__init__()
        if kind not in ("smooth", "fourier"):
            raise ValueError(f"EFEmbedding: unknown kind {kind!r}; choose smooth or fourier")
        self.kind, self.dim = kind, dim
        features = 1 + 2 * len(EF_PERIODS) if kind == "smooth" else dim
        self.mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def features(self, ef: Tensor) -> Tensor:
        """The MLP's input for ef: (B,) percent."""
        return smooth_ef_features(ef) if self.kind == "smooth" else sinusoidal_embedding(ef / 100.0, self.dim)

    def forward(self, ef: Tensor) -> Tensor:
        """Embed ef: (B,) percent 0-100 -> (B, dim)."""
        return self.mlp(self.features(ef))


def ef_condition(embedding: EFEmbedding, null: nn.Embedding, ef: Tensor | None, drop: Tensor | None,
                 batch: int, device: torch.device) -> Tensor:
    """(B, dim) EF embedding, the learned ``null`` where ``ef`` is None or ``drop`` (B,) is True (guidance)."""
    empty = null(torch.zeros(batch, dtype=torch.long, device=device))
    if ef is None:
        return empty
    return embedding(ef) if drop is None else torch.where(drop[:, None], empty, embedding(ef))


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide ``channels``."""
    return nn.GroupNorm(math.gcd(channels, 32), channels)


class TemporalConv(nn.Module):
    """A (k, 1, 1) convolution over time of clips (B, C, T, H, W), run as a (k, 1) 2D convolution on (T, H·W).

    The same function as ``nn.Conv3d(..., (k, 1, 1))``, at 2.2-2.4x its speed on one CPU thread (oneDNN has no fast
    path for 3D kernels that are 1 wide in space; demo video flow maps, forward + backward); a 2D convolution keeps
    Opacus' and the fast DP engine's per-sample gradients (the batch stays first).
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, (kernel, 1), stride=(stride, 1), padding=(kernel // 2, 0))

    def forward(self, x: Tensor) -> Tensor:
        """Clips (B, C, T, H, W) -> (B, C', T', H, W)."""
        return self.conv(x.flatten(3)).unflatten(3, x.shape[3:])


def conv(in_channels: int, out_channels: int, *, video: bool, kernel: int = 3) -> nn.Module:
    """Same-size convolution: 2D for frames, factorised (2+1)D for clips (kernel 1: pointwise)."""
    pad = kernel // 2
    if not video:
        return nn.Conv2d(in_channels, out_channels, kernel, padding=pad)
    if kernel == 1:
        return nn.Conv3d(in_channels, out_channels, 1)
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, (1, kernel, kernel), padding=(0, pad, pad)),
        nn.SiLU(),
        TemporalConv(out_channels, out_channels, kernel=kernel),
    )


class ResBlock(nn.Module):
    """Pre-activation residual block, (GroupNorm, SiLU, conv) x 2, optionally conditioned by FiLM.

    With ``emb_dim`` the embedding scales and shifts the second norm — after the norm (as in ADM), not a bias
    before it: with one channel per group GroupNorm would erase a per-channel bias, and with it all conditioning.
    Without it (the VAE, the re-id encoder) the block is unconditioned.
    """

    def __init__(self, in_channels: int, out_channels: int, *, emb_dim: int | None = None, video: bool = False) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv(in_channels, out_channels, video=video)
        self.emb = nn.Linear(emb_dim, 2 * out_channels) if emb_dim is not None else None
        self.norm2 = group_norm(out_channels)
        self.conv2 = conv(out_channels, out_channels, video=video)
        self.skip = (
            nn.Identity() if in_channels == out_channels else conv(in_channels, out_channels, video=video, kernel=1)
        )

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        """x: (B, C_in, [T,] H, W), emb: (B, emb_dim) when conditioned -> (B, C_out, [T,] H, W)."""
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if self.emb is not None:
            if emb is None:
                raise ValueError("ResBlock: built with emb_dim, called without an embedding")
            film = self.emb(F.silu(emb))
            scale, shift = film.view(*film.shape, *([1] * (x.dim() - 2))).chunk(2, dim=1)
            h = h * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class Attention(nn.Module):
    """Residual multi-head self-attention: over H·W positions for frames, over T frames for clips.

    Without positions attention is blind to order: permuting a clip's frames permutes its output, and only the
    temporal convolutions' zero padding tells a frame how far it is from the clip's start. ``positions=True`` adds
    the sinusoidal encoding of the frame index (as the Transformer's, no learned tensor) to the tokens before the
    projections (clips only; VDM uses relative position biases; absolute here, since frame 0 is the conditioning
    frame).
    """

    def __init__(self, channels: int, *, heads: int, video: bool, positions: bool = False) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"Attention: channels {channels} not divisible by heads {heads}")
        if positions and not video:
            raise ValueError("Attention: positions are frame indices, for clips (video=True) only")
        self.heads = heads
        self.video = video
        self.positions = positions
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def _tokens(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 1, H·W, C); (B, C, T, H, W) -> (B, H·W, T, C)."""
        if self.video:
            b, c, t, h, w = x.shape
            return x.permute(0, 3, 4, 2, 1).reshape(b, h * w, t, c)
        return x.flatten(2).transpose(1, 2).unsqueeze(1)

    def _untokens(self, tokens: Tensor, shape: torch.Size) -> Tensor:
        if self.video:
            b, c, t, h, w = shape
            return tokens.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)
        return tokens.squeeze(1).transpose(1, 2).reshape(shape)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, [T,] H, W) -> same shape."""
        tokens = self._tokens(self.norm(x))
        *lead, length, channels = tokens.shape
        if self.positions:
            index = torch.arange(length, device=x.device) / 1000.0  # sinusoidal_embedding scales by 1000
            tokens = tokens + sinusoidal_embedding(index, channels).to(tokens.dtype)
        q, k, v = (
            part.reshape(*lead, length, self.heads, -1).transpose(-3, -2)
            for part in self.qkv(tokens).chunk(3, dim=-1)
        )
        attended = F.scaled_dot_product_attention(q, k, v).transpose(-3, -2).reshape(*lead, length, channels)
        return x + self._untokens(self.out(attended), x.shape)


class Downsample(nn.Module):
    """Strided convolution halving H and W (never T)."""

    def __init__(self, channels: int, *, video: bool) -> None:
        super().__init__()
        self.conv: nn.Module = (
            nn.Conv3d(channels, channels, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
            if video
            else nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, [T,] H, W) -> (B, C, [T,] ceil(H/2), ceil(W/2))."""
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to the skip connection's size, then a convolution changing channels."""

    def __init__(self, in_channels: int, out_channels: int, *, video: bool) -> None:
        super().__init__()
        self.conv = conv(in_channels, out_channels, video=video)

    def forward(self, x: Tensor, size: torch.Size) -> Tensor:
        """x: (B, C_in, [T,] h, w) -> (B, C_out, *size); size may be odd (14x14 latents -> 7 -> 14)."""
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))
