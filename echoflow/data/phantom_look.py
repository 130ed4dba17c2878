"""The phantom's ultrasound look and the scanner style of each site.

Reflectivity -> multiplicative speckle (the magnitude of blurred complex Gaussian noise: Rayleigh, spatially
correlated, partly persistent across frames) -> point-spread blur -> depth attenuation -> noise floor -> log
compression and gain -> the sector fan, apex at the top centre. A :class:`SiteStyle` sets each of these per
hospital, so sites are non-IID the way different scanners and presets are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SiteStyle:
    """One site's scanner and preset.

    Attributes:
        gain: display gain, multiplies the log-compressed image (about 0.75-1.2).
        fan_angle: full sector opening, degrees.
        depth: imaging depth, cm; it is the frame's height, so it sets the pixel size.
        speckle: speckle strength, 0 (none) to 1 (fully developed).
        speckle_size: speckle correlation length (Gaussian sigma), cm.
        blur: point-spread-function sigma, cm.
        noise_floor: additive electronic noise, in reflectivity units.
        attenuation: residual depth attenuation after time-gain compensation, 1/cm (amplitude).
        dynamic_range: log-compression strength K in log(1 + K·a) / log(1 + K).
    """

    gain: float
    fan_angle: float
    depth: float
    speckle: float
    speckle_size: float
    blur: float
    noise_floor: float
    attenuation: float
    dynamic_range: float


def sample_site_style(rng: np.random.Generator) -> SiteStyle:
    """Draw a site's scanner style; ranges wide enough that sites differ more than videos within a site."""
    return SiteStyle(
        gain=float(rng.uniform(0.75, 1.2)), fan_angle=float(rng.uniform(70.0, 90.0)),
        depth=float(rng.uniform(15.0, 18.0)), speckle=float(rng.uniform(0.55, 0.95)),
        speckle_size=float(rng.uniform(0.08, 0.16)), blur=float(rng.uniform(0.05, 0.14)),
        noise_floor=float(rng.uniform(0.003, 0.02)), attenuation=float(rng.uniform(0.02, 0.08)),
        dynamic_range=float(rng.uniform(8.0, 40.0)),
    )


@dataclass(frozen=True)
class PixelGrid:
    """Pixel centres in cm from the probe (the fan's apex, above the top row's centre).

    Pixel ``(row i, column j)`` has its centre at ``x = (j - (W-1)/2)·spacing``, ``y = (i + 0.5)·spacing`` — the
    same integer-centre convention as EchoNet's tracings (X = column, Y = row).

    Attributes:
        x, y: (1, H, W) cm; spacing: cm per pixel; size: H = W, pixels.
    """

    x: np.ndarray
    y: np.ndarray
    spacing: float
    size: int

    @classmethod
    def square(cls, size: int, depth: float) -> PixelGrid:
        """A ``size``×``size`` grid covering ``depth`` cm from the probe."""
        spacing = depth / size
        centres = np.arange(size, dtype=np.float64)
        x = (centres[None, None, :] - (size - 1) / 2.0) * spacing
        y = (centres[None, :, None] + 0.5) * spacing
        return cls(np.broadcast_to(x, (1, size, size)), np.broadcast_to(y, (1, size, size)), spacing, size)

    def to_pixels(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cm from the probe -> (column X, row Y) in pixels."""
        return x / self.spacing + (self.size - 1) / 2.0, y / self.spacing - 0.5


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of the last two axes (..., S, S), sigma in pixels; edges renormalised, no wrap-around."""
    size = images.shape[-1]
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :]
    kernel = np.exp(-0.5 * (offsets / max(sigma, 1e-3)) ** 2)
    kernel_t = (kernel / kernel.sum(axis=1, keepdims=True)).T
    # Two flat matrix products (one BLAS call each); `kernel @ images` on a stack is ~50x slower in numpy.
    rows = (images.reshape(-1, size) @ kernel_t).reshape(images.shape)
    columns = np.swapaxes(rows, -1, -2).reshape(-1, size) @ kernel_t
    return np.swapaxes(columns.reshape(images.shape), -1, -2)


def background_reflectivity(grid: PixelGrid, rng: np.random.Generator) -> np.ndarray:
    """Tissue around the heart, (1, H, W): a bright chest wall near the probe, fainter lung and mediastinum."""
    radius = np.hypot(grid.x, grid.y)
    clutter = _blur(rng.standard_normal((1, grid.size, grid.size)), 2.0 / grid.spacing)
    clutter /= clutter.std() + 1e-9
    return np.clip(0.05 + 0.03 * clutter + 0.5 * np.exp(-radius / 1.0), 0.01, 1.0)


def ultrasound_look(reflectivity: np.ndarray, style: SiteStyle, grid: PixelGrid,
                    rng: np.random.Generator) -> np.ndarray:
    """Render reflectivity (T, H, W) >= 0 as a B-mode sector cine, (T, H, W) uint8."""
    frames = reflectivity.shape[0]
    field = _blur(rng.standard_normal((2, frames, grid.size, grid.size)), style.speckle_size / grid.spacing)
    for t in range(1, frames):  # speckle decorrelates over a few frames as tissue moves
        field[:, t] = 0.7 * field[:, t - 1] + np.sqrt(1.0 - 0.7**2) * field[:, t]
    rayleigh = np.hypot(field[0], field[1])
    rayleigh /= np.sqrt(np.mean(rayleigh**2))
    amplitude = reflectivity * (1.0 - style.speckle + style.speckle * rayleigh)
    amplitude = _blur(amplitude, style.blur / grid.spacing)

    radius, angle = np.hypot(grid.x, grid.y), np.arctan2(grid.x, grid.y)
    amplitude *= np.exp(-style.attenuation * radius)
    amplitude += style.noise_floor * np.hypot(*rng.standard_normal((2, *amplitude.shape)))
    image = style.gain * np.log1p(style.dynamic_range * amplitude) / np.log1p(style.dynamic_range)
    # Soft fan edges, about a pixel wide, for the sector's sides and its bottom arc.
    side = np.clip((np.deg2rad(style.fan_angle / 2.0) - np.abs(angle)) * radius / grid.spacing + 0.5, 0.0, 1.0)
    arc = np.clip((style.depth - radius) / grid.spacing + 0.5, 0.0, 1.0)
    return np.clip(np.rint(255.0 * image * side * arc), 0, 255).astype(np.uint8)
