"""One conditional U-Net body for both latent flow networks (frames, or clips with ``video=True``)."""

from collections.abc import Callable, Sequence
from functools import partial
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echoflow.models.blocks import Attention, Downsample, ResBlock, Upsample, conv, group_norm


def _fold(x: Tensor, patch: int, shuffle: Callable[[Tensor, int], Tensor]) -> Tensor:
    """Apply a pixel (un)shuffle to the channels and space of a frame or clip, leaving T alone."""
    if patch == 1:
        return x
    if x.dim() == 5:
        return shuffle(x.transpose(1, 2), patch).transpose(1, 2)
    return shuffle(x, patch)


class UNetLevel(nn.Module):
    """Residual blocks at one resolution, each optionally followed by attention."""

    def __init__(
        self, in_channels: int, out_channels: int, *, blocks: int, attention: bool, emb_dim: int, heads: int,
        video: bool, positions: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(blocks):
            layers.append(ResBlock(in_channels if i == 0 else out_channels, out_channels, emb_dim=emb_dim,
                                   video=video))
            if attention:
                layers.append(Attention(out_channels, heads=heads, video=video, positions=positions))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, C_in, [T,] H, W), emb: (B, emb_dim) -> (B, C_out, [T,] H, W)."""
        for layer in self.layers:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """U-Net mapping (B, C_in, [T,] H, W) and a conditioning embedding to (B, C_out, [T,] H, W).

    Level ``i`` works at resolution H / 2**i with ``channels[i]`` channels; skips are concatenated on the
    way up; the bottleneck is ResBlock-Attention-ResBlock. Clips are downsampled in space only.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        blocks: int,
        attention: Sequence[bool],
        emb_dim: int,
        heads: int,
        video: bool,
        patch: int = 1,
        positions: bool = False,
    ) -> None:
        """Build the U-Net.

        Args:
            in_channels: input channels.
            out_channels: output channels.
            channels: channels per level, e.g. (64, 128); one level per entry.
            blocks: residual blocks per level, per direction.
            attention: per level, whether blocks are followed by attention (spatial for frames,
                temporal for clips).
            emb_dim: size of the conditioning embedding.
            heads: attention heads.
            video: clips (B, C, T, H, W) with (2+1)D convolutions instead of frames (B, C, H, W).
            patch: side of the square patches folded into channels before level 0 (and unfolded after),
                as in DiT's patchify; 2 makes a 16x16 latent a 8x8 grid, 4x cheaper. H, W divisible by it.
            positions: clips' temporal attention sees each frame's index (see :class:`Attention`).
        """
        super().__init__()
        if len(attention) != len(channels):
            raise ValueError(f"UNet: {len(attention)} attention flags for {len(channels)} levels")
        self.patch = patch
        self.conv_in = conv(in_channels * patch**2, channels[0], video=video)
        stage = partial(UNetLevel, blocks=blocks, emb_dim=emb_dim, heads=heads, video=video, positions=positions)
        self.down = nn.ModuleList(
            stage(channels[max(i - 1, 0)], c, attention=attn)
            for i, (c, attn) in enumerate(zip(channels, attention, strict=True))
        )
        self.downsample = nn.ModuleList(Downsample(c, video=video) for c in channels[:-1])
        self.mid = stage(channels[-1], channels[-1], attention=True)
        self.upsample = nn.ModuleList(
            Upsample(c_deep, c, video=video) for c, c_deep in pairwise(channels)
        )
        self.up = nn.ModuleList(
            stage(2 * c, c, attention=attn)
            for c, attn in zip(channels, attention, strict=True)
        )
        self.norm_out = group_norm(channels[0])
        self.conv_out = conv(channels[0], out_channels * patch**2, video=video)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, C_in, [T,] H, W), emb: (B, emb_dim) -> (B, C_out, [T,] H, W)."""
        if x.shape[-1] % self.patch or x.shape[-2] % self.patch:
            raise ValueError(f"UNet: size {tuple(x.shape[-2:])} not divisible by patch {self.patch}")
        h = self.conv_in(_fold(x, self.patch, F.pixel_unshuffle))
        skips = []
        for level, stage in enumerate(self.down):
            h = stage(h, emb)
            skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
        h = self.mid(h, emb)
        for level in reversed(range(len(self.up))):
            skip = skips.pop()
            if level < len(self.upsample):
                h = self.upsample[level](h, skip.shape[2:])
            h = self.up[level](torch.cat([h, skip], dim=1), emb)
        return _fold(self.conv_out(F.silu(self.norm_out(h))), self.patch, F.pixel_shuffle)
