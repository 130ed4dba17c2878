"""The EF meter that is not the judge: an `LVSegmenter` trained on the sites' LV masks.

Generated videos carry no mask, so their EF is measured by a segmenter trained on real frames and their LV
cavity masks (the phantom's ``LVMasks``) and read by area–length over the clip
(`echoflow.models.segmenter.LVSegmenter.ef`) — independent of the real-trained EF regressor.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from echoflow.errors import EchoFlowError
from echoflow.models.segmenter import LVSegmenter, augment_frames, segmentation_loss
from echoflow.stages.trainer import TrainConfig, Trainer


class SegmenterStage:
    """The LV segmenter as a `echoflow.training.Stage`: batches of ``frame`` (B, 1, H, W) and ``mask``."""

    name = "segmenter"

    def __init__(self, net: LVSegmenter, *, augment: bool = True) -> None:
        self.net, self.augment = net, augment

    def groups(self) -> dict[str, nn.Module]:
        """``model``: the segmenter."""
        return {"model": self.net}

    def loss(self, group: str, batch: dict[str, Tensor], *, step: int) -> tuple[Tensor, dict[str, float]]:
        """BCE + Dice on (augmented) frames."""
        frames = augment_frames(batch["frame"]) if self.augment else batch["frame"]
        return segmentation_loss(self.net(frames), batch["mask"]), {}


def fit_segmenter(
    frames: np.ndarray,
    masks: np.ndarray,
    *,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    augment: bool = True,
    quiet: bool = True,
) -> LVSegmenter:
    """Train an `LVSegmenter` on frames (N, H, W) uint8 with masks (N, H, W) bool; returns the EMA network.

    Trains with the shared `Trainer` (AdamW, clipping, EMA 0.99, per-step seeding); 600 steps of 32 frames
    take about a minute on one CPU thread at 64x64.
    """
    if frames.shape != masks.shape or frames.ndim != 3 or len(frames) == 0:
        raise EchoFlowError(f"fit_segmenter: frames {frames.shape} and masks {masks.shape} must be equal (N, H, W)")
    pixels = torch.from_numpy(frames).float().div(127.5).sub(1).unsqueeze(1)
    targets = torch.from_numpy(masks.astype(np.float32)).unsqueeze(1)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, ema_decay=0.99, seed=seed, log_every=steps)
    torch.manual_seed(seed)
    trainer = Trainer(SegmenterStage(LVSegmenter(), augment=augment), config)

    def draw() -> dict[str, Tensor]:
        index = torch.randint(len(pixels), (batch_size,))
        return {"frame": pixels[index], "mask": targets[index]}

    trainer.fit(draw, quiet=quiet)
    return cast(LVSegmenter, trainer.averaged_model()).eval()
