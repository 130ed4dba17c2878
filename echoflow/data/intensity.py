"""Pixel intensities: uint8 videos <-> [-1, 1] floats, and the copies-with-a-twist of a frame.

Videos are stored and decoded as uint8 (0-255); every network sees ``pixel / 127.5 - 1``. The `TRANSFORMS`
(exact, shifted, re-gained, re-speckled, mirrored copies) are what a copy of a real frame might look like: the
re-id model trains on them as more visits of the same patient, and the audit plants them as canaries.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor


def to_unit(pixels: np.ndarray | Tensor) -> Tensor:
    """uint8 pixels (any shape) -> float32 tensor in [-1, 1]."""
    tensor = torch.from_numpy(pixels) if isinstance(pixels, np.ndarray) else pixels
    return tensor.float().div(127.5).sub(1.0)


def to_uint8(unit: np.ndarray | Tensor) -> np.ndarray:
    """Floats in [-1, 1] (any shape) -> uint8 pixels, rounded and clipped."""
    tensor = torch.from_numpy(unit) if isinstance(unit, np.ndarray) else unit
    tensor = tensor if tensor.is_floating_point() else tensor.float()  # float64 stays float64: same rounding
    return ((tensor + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def _shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Translate by 1-3 pixels in H and W; uncovered pixels black (-1)."""
    dy, dx = (int(v) * int(rng.choice([-1, 1])) for v in rng.integers(1, 4, size=2))
    out = np.full_like(x, -1.0)
    h, w = x.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _gain(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Intensity gain of ±10 % on [0, 1] intensities, clipped."""
    gain = 1.0 + 0.1 * float(rng.choice([-1, 1]))
    return np.clip(((x + 1.0) / 2.0) * gain, 0.0, 1.0) * 2.0 - 1.0


def _speckle(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Re-speckle: multiplicative gamma noise (mean 1, std 0.1) on [0, 1] intensities."""
    noise = rng.gamma(shape=100.0, scale=0.01, size=x.shape)
    return np.clip(((x + 1.0) / 2.0) * noise, 0.0, 1.0) * 2.0 - 1.0


TRANSFORMS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "exact": lambda x, rng: x.copy(),
    "shift": _shift,
    "gain": _gain,
    "speckle": _speckle,
    "mirror": lambda x, rng: x[..., ::-1].copy(),
}
