"""Latent image flow: the network that turns noise into latent echo frames (B, C, h, w)."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from echoflow.errors import EchoFlowError
from echoflow.models.blocks import EFEmbedding, EFEmbeddingKind, ScalarEmbedding, ef_condition
from echoflow.models.unet import UNet


class LatentImageFlow(nn.Module):
    """U-Net predicting the velocity (or x1) of latent frames, optionally conditioned on the site and on EF.

    EF conditioning draws each frame's anatomy for the EF its video will be animated at, so heart size and
    function stay coupled as in real hearts (dilated hearts pump less); without it a frame's heart is drawn
    independently of the EF requested later.

    Spatial self-attention runs at the coarsest level and in the bottleneck. The demo defaults have ~1.3M
    parameters; the paper-size model is e.g. ``channels=(128, 256, 256), blocks=2, heads=8``.
    Opacus-compatible (see :mod:`echoflow.models.blocks`).
    """

    def __init__(
        self,
        *,
        latent_channels: int = 4,
        channels: Sequence[int] = (64, 128),
        blocks: int = 1,
        heads: int = 4,
        num_sites: int = 0,
        ef_embedding: EFEmbeddingKind | None = None,
    ) -> None:
        """Build the network.

        Args:
            latent_channels: channels of a latent frame.
            channels: U-Net channels per level; the latent is halved in size per extra level.
            blocks: residual blocks per level.
            heads: attention heads.
            num_sites: number of sites for site conditioning; 0 = unconditional. Site index
                ``num_sites`` is the learned null class used when the site is absent or dropped.
            ef_embedding: None = no EF conditioning; ``"smooth"`` or ``"fourier"`` embeds EF as the video flow
                does (:class:`~echoflow.models.blocks.EFEmbedding`), with a learned null EF for dropped rows.
        """
        super().__init__()
        emb_dim = 4 * channels[0]
        self.num_sites = num_sites
        self.time = ScalarEmbedding(emb_dim)
        self.site = nn.Embedding(num_sites + 1, emb_dim) if num_sites else None
        self.ef = EFEmbedding(emb_dim, kind=ef_embedding) if ef_embedding else None
        self.null_ef = nn.Embedding(1, emb_dim) if ef_embedding else None
        self.unet = UNet(
            in_channels=latent_channels,
            out_channels=latent_channels,
            channels=channels,
            blocks=blocks,
            attention=[level == len(channels) - 1 for level in range(len(channels))],
            emb_dim=emb_dim,
            heads=heads,
            video=False,
        )

    def forward(self, x: Tensor, t: Tensor, *, site: Tensor | None = None, ef: Tensor | None = None,
                drop: Tensor | None = None) -> Tensor:
        """Predict the velocity (or x1) at x_t.

        Args:
            x: (B, C, h, w) point x_t on the path.
            t: (B,) flow time in [0, 1].
            site: (B,) long site indices in [0, num_sites); None = null class.
            ef: (B,) EF in percent of the video the frame will start; None = null EF.
            drop: (B,) bool; True rows use the null site and EF (classifier-free guidance).

        Returns:
            (B, C, h, w).
        """
        if x.dim() != 4:
            raise EchoFlowError(f"LatentImageFlow.x: expected (B, C, h, w) latents, got {tuple(x.shape)}")
        emb = self.time(t)
        if self.site is not None:
            null = torch.full((x.shape[0],), self.num_sites, dtype=torch.long, device=x.device)
            index = null if site is None else site if drop is None else torch.where(drop, null, site)
            emb = emb + self.site(index)
        elif site is not None:
            raise EchoFlowError("LatentImageFlow.site: model built with num_sites=0 cannot take a site")
        if self.ef is not None and self.null_ef is not None:
            emb = emb + ef_condition(self.ef, self.null_ef, ef, drop, x.shape[0], x.device)
        elif ef is not None:
            raise EchoFlowError("LatentImageFlow.ef: model built without ef_embedding cannot take an EF")
        return self.unet(x, emb)


def conditions_on_ef(flow: nn.Module) -> bool:
    """Whether ``flow`` is a `LatentImageFlow` that draws each frame for a given EF."""
    return isinstance(flow, LatentImageFlow) and flow.ef is not None
