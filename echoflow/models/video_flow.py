"""Latent video flow: animates a latent frame into a latent clip (B, C, T, h, w) at a requested EF."""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from echoflow.errors import EchoFlowError
from echoflow.models.blocks import EFEmbedding, EFEmbeddingKind, ScalarEmbedding, ef_condition
from echoflow.models.flow import Method, Target, sample
from echoflow.models.unet import UNet


class LatentVideoFlow(nn.Module):
    """Factorised space-time U-Net predicting the velocity (or x1) of latent clips.

    Conditioning: the first latent frame is repeated over T and concatenated to x_t as extra channels; EF
    is embedded (smooth features of EF + MLP, see ``ef_embedding``) and added to the time embedding.
    (2+1)D convolutions and temporal attention at every level; space is downsampled, time never. The demo
    defaults have ~0.6M parameters and fold 2x2 latent patches into channels; paper size e.g.
    ``channels=(128, 256, 256), blocks=2, heads=8``. Opacus-compatible.
    """

    def __init__(
        self,
        *,
        latent_channels: int = 4,
        channels: Sequence[int] = (32, 64),
        blocks: int = 1,
        heads: int = 4,
        patch: int = 2,
        motion_scale: float = 1.0,
        ef_embedding: EFEmbeddingKind = "smooth",
        frame_positions: bool = False,
    ) -> None:
        """Build the network.

        Args:
            latent_channels: channels of a latent frame.
            channels: U-Net channels per level.
            blocks: residual blocks per level.
            heads: temporal attention heads.
            patch: spatial patch size folded into channels first (1 = none); h, w must divide by it.
            motion_scale: std of a latent clip's motion (clip minus its first frame); the flow runs on motion
                divided by it, so the whole loss is on how the heart moves, not on re-drawing the anatomy.
            ef_embedding: ``"smooth"`` (features of EF with periods of 20-160 points plus a linear coordinate)
                or ``"fourier"`` (the timestep embedding of EF/100, the earlier default), see
                :class:`~echoflow.models.blocks.EFEmbedding`.
            frame_positions: temporal attention sees each frame's index (sinusoidal, no parameters); without it
                attention is order-blind and only the temporal convolutions' padding places a frame in the clip.
        """
        super().__init__()
        emb_dim = 4 * channels[0]
        self.register_buffer("motion_scale", torch.tensor(float(motion_scale)))
        self.time = ScalarEmbedding(emb_dim)
        self.ef = EFEmbedding(emb_dim, kind=ef_embedding)
        self.null_ef = nn.Embedding(1, emb_dim)
        self.unet = UNet(
            in_channels=2 * latent_channels,
            out_channels=latent_channels,
            channels=channels,
            blocks=blocks,
            attention=[True] * len(channels),
            emb_dim=emb_dim,
            heads=heads,
            video=True,
            patch=patch,
            positions=frame_positions,
        )

    motion_scale: Tensor

    def to_motion(self, clip: Tensor, first_frame: Tensor) -> Tensor:
        """Latent clip (B, C, T, h, w) -> unit-scale motion relative to ``first_frame`` (B, C, h, w)."""
        return (clip - first_frame.unsqueeze(2)) / self.motion_scale

    def from_motion(self, motion: Tensor, first_frame: Tensor) -> Tensor:
        """Inverse of `to_motion`."""
        return first_frame.unsqueeze(2) + motion * self.motion_scale

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        first_frame: Tensor,
        ef: Tensor | None = None,
        drop: Tensor | None = None,
    ) -> Tensor:
        """Predict the velocity (or x1) at x_t.

        Args:
            x: (B, C, T, h, w) point x_t on the path.
            t: (B,) flow time in [0, 1].
            first_frame: (B, C, h, w) latent frame the clip starts from.
            ef: (B,) ejection fraction in percent, 0-100; None = null embedding.
            drop: (B,) bool; True rows use the null EF embedding (classifier-free guidance).

        Returns:
            (B, C, T, h, w).
        """
        if x.dim() != 5 or first_frame.shape != (x.shape[0], x.shape[1], *x.shape[3:]):
            raise EchoFlowError(
                f"LatentVideoFlow.first_frame: expected (B, C, h, w) matching x (B, C, T, h, w) = "
                f"{tuple(x.shape)}, got {tuple(first_frame.shape)}"
            )
        batch, frames = x.shape[0], x.shape[2]
        ef_emb = ef_condition(self.ef, self.null_ef, ef, drop, batch, x.device)
        repeated = first_frame.unsqueeze(2).expand(-1, -1, frames, -1, -1)
        return self.unet(torch.cat([x, repeated], dim=1), self.time(t) + ef_emb)


@torch.no_grad()
def animate(
    model: LatentVideoFlow,
    first_frame: Tensor,
    ef: Tensor,
    *,
    frames: int,
    steps: int,
    guidance: float = 1.0,
    method: Method = "euler",
    target: Target = "velocity",
    window: int = 16,
    overlap: int = 4,
    generator: torch.Generator | None = None,
    advance: Callable[[int], None] | None = None,
) -> Tensor:
    """Generate a latent clip of any length by overlapping windows of ``window`` frames.

    The first window is conditioned on ``first_frame``. Each next window starts ``window - overlap``
    frames later and is conditioned on the already generated frame at its start (the first overlap
    frame), as training conditioned on a clip's own first frame. In the overlap the two windows are
    cross-faded linearly, the new window's weight rising from 0 at its conditioning frame, so there is no
    seam. EF stays the same across windows. Limitation: only that one frame links windows, so cardiac
    phase can drift across a seam; inpainting the whole overlap during sampling would constrain it more.

    Args:
        model: a :class:`LatentVideoFlow` (or any network with its call signature), in eval mode.
        first_frame: (B, C, h, w) latent frame, e.g. from the latent image flow.
        ef: (B,) ejection fraction in percent, 0-100.
        frames: clip length to return, ≥ 1.
        steps: ODE steps per window.
        guidance: classifier-free guidance scale on EF.
        method: ODE method, see :func:`echoflow.models.flow.sample`.
        target: what the network predicts.
        window: frames generated per window (the training clip length).
        overlap: frames shared by consecutive windows, 1 ≤ overlap < window.
        generator: random generator for the noise.
        advance: called after each window with how many frames it finished over the batch (they sum to
            B × ``frames``), e.g. a progress bar's ``advance``.

    Returns:
        (B, C, frames, h, w) latent clip; frame 0 is the model's rendering of ``first_frame``.
    """
    if frames < 1 or not 1 <= overlap < window:
        raise EchoFlowError(f"animate: need frames ≥ 1 and 1 ≤ overlap < window, got {frames=}, "
                            f"{window=}, {overlap=}")
    batch, channels, height, width = first_frame.shape
    shape = (batch, channels, window, height, width)
    clip = torch.empty(batch, channels, 0, height, width, dtype=first_frame.dtype, device=first_frame.device)
    fade = (torch.arange(overlap, dtype=first_frame.dtype, device=first_frame.device) / overlap)
    fade = fade.view(1, 1, overlap, 1, 1)
    condition, start = first_frame, 0
    while True:
        noise = torch.randn(shape, generator=generator, dtype=first_frame.dtype).to(first_frame.device)
        motion = sample(model, noise, steps=steps, method=method, target=target, guidance=guidance,
                        first_frame=condition, ef=ef)
        new = model.from_motion(motion, condition)
        if start:
            blended = (1 - fade) * clip[:, :, start:] + fade * new[:, :, :overlap]
            new = torch.cat([blended, new[:, :, overlap:]], dim=2)
        clip = torch.cat([clip[:, :, :start], new], dim=2)
        if advance is not None:  # finished before this window: start + overlap frames (none before the first)
            advance(batch * (min(clip.shape[2], frames) - start - (overlap if start else 0)))
        if clip.shape[2] >= frames:
            return clip[:, :, :frames]
        start = clip.shape[2] - overlap
        condition = clip[:, :, start]
