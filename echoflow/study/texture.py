"""Texture fidelity of the VAE and of released videos: decoded frames against real ones, by their spectra.

The statistic is the radially averaged power spectrum (RAPSD) of each frame: the frame's 2-D power spectrum
averaged over rings of equal spatial frequency, normalised to total power 1 (so gain and contrast do not count,
only how the power is spread over scales) and taken as a natural log. Speckle lives in the high-frequency half of
the rings: a VAE that blurs drops power there. Two sets of frames are compared by the mean absolute difference of
their mean log spectra (the mean |log power ratio| per ring), over all rings and over the high half alone.

`texture_report` measures, on held-out real clips: real vs VAE-reconstructed, real vs released (generated)
frames, and real vs a second held-out real split (the noise floor a perfect model would reach), next to the
real-trained EF regressor's MAE on the reconstructions vs on the originals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from echoflow.data.intensity import to_uint8
from echoflow.data.sites import SiteData
from echoflow.errors import EchoFlowError
from echoflow.figures import png_base64
from echoflow.models.vae import AdversarialVAE
from echoflow.study.evaluate import ef_gap, first_clips, reconstruct


def rapsd(frames: np.ndarray) -> np.ndarray:
    """Log radially averaged power spectra (N, R) of frames (N, H, W), any dtype; R = min(H, W) // 2 rings.

    Ring r (1..R) holds spatial frequencies of about r / min(H, W) cycles per pixel; the DC term is left out.
    Each frame's ring powers are normalised to sum 1 before the log.
    """
    x = np.asarray(frames, np.float64)
    if x.ndim != 3 or min(x.shape[1:]) < 4 or len(x) == 0:
        raise EchoFlowError(f"texture: expected (N>=1, H>=4, W>=4) frames, got {x.shape}")
    h, w = x.shape[1:]
    rings = min(h, w) // 2
    power = np.abs(np.fft.fft2(x - x.mean(axis=(1, 2), keepdims=True))) ** 2
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")) * min(h, w)
    ring = radius.round().astype(int).ravel()
    keep = (ring >= 1) & (ring <= rings)
    members = np.zeros((h * w, rings))
    members[np.flatnonzero(keep), ring[keep] - 1] = 1.0
    mean = power.reshape(len(x), -1) @ (members / members.sum(0))
    mean /= np.maximum(mean.sum(1, keepdims=True), np.finfo(np.float64).tiny)
    return np.log(mean + 1e-12)


@dataclass(frozen=True)
class SpectrumDistance:
    """Mean |log power ratio| between two sets' mean log spectra: ``all`` rings and the ``high``-frequency half."""

    all: float
    high: float


def spectrum_distance(a: np.ndarray, b: np.ndarray) -> SpectrumDistance:
    """Distance of two sets of log spectra (N, R) and (M, R) from `rapsd` (0 for identical sets)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise EchoFlowError(f"texture: need (N, R) and (M, R) spectra, got {a.shape} and {b.shape}")
    gap = np.abs(a.mean(0) - b.mean(0))
    return SpectrumDistance(float(gap.mean()), float(gap[a.shape[1] // 2:].mean()))


def clip_frames(clips: Tensor, *, every: int = 4) -> np.ndarray:
    """Every ``every``-th frame of clips (N, 1, T, H, W) in [-1, 1] as uint8 (N * T/every, H, W), as released."""
    return to_uint8(clips[:, 0, ::every]).reshape(-1, *clips.shape[-2:])


@dataclass
class TextureReport:
    """Texture fidelity on held-out real clips.

    Attributes:
        distance: ``reconstructed|released|real_floor`` -> distance of that set to the real frames.
        vae_ef: the real-trained regressor's EF MAE on originals vs reconstructions (see `ef_gap`).
        spectra: set name (``real``, ``reconstructed``, ``released``, ``real_floor``) -> mean log spectrum (R,).
        examples: set name -> a few frames (K, H, W) uint8, for the side-by-side figure.
        frames: set name -> number of frames measured.
    """

    distance: dict[str, SpectrumDistance]
    vae_ef: dict[str, float]
    spectra: dict[str, np.ndarray]
    examples: dict[str, np.ndarray]
    frames: dict[str, int]

    def scalars(self) -> dict[str, float]:
        """Flat metrics: ``rapsd.<set>.all|high``, ``vae_ef.<key>``."""
        flat = {f"rapsd.{name}.{part}": value for name, d in self.distance.items() for part, value in asdict(d).items()}
        return flat | {f"vae_ef.{key}": value for key, value in self.vae_ef.items()}

    def to_json(self) -> dict[str, Any]:
        """Everything but the example frames, as JSON-ready containers."""
        return {"distance": {name: asdict(d) for name, d in self.distance.items()}, "vae_ef": self.vae_ef,
                "frames": self.frames, "spectra": {name: s.tolist() for name, s in self.spectra.items()}}


def texture_report(vae: AdversarialVAE, regressor: nn.Module, real: Sequence[SiteData], floor: Sequence[SiteData],
                   released: Sequence[SiteData], *, frames: int, fps: float, every: int = 4,
                   examples: int = 6) -> TextureReport:
    """Texture of reconstructions, released videos and a second real split, each against ``real``'s frames.

    ``real``, ``floor``: two held-out real splits (e.g. TEST and VAL); ``released``: the released videos' sites.
    Every video contributes its first clip (``frames`` at ``fps``), every ``every``-th frame of it, as uint8.
    """
    clips, ef, _ = first_clips(real, frames=frames, fps=fps)
    recon = reconstruct(vae, clips)
    sets = {"real": clips, "reconstructed": recon, "released": first_clips(released, frames=frames, fps=fps)[0],
            "real_floor": first_clips(floor, frames=frames, fps=fps)[0]}
    pixels = {name: clip_frames(c, every=every) for name, c in sets.items()}
    spectra = {name: rapsd(p) for name, p in pixels.items()}
    middle = {name: to_uint8(c[:examples, 0, c.shape[2] // 2]) for name, c in sets.items()}
    return TextureReport(
        distance={name: spectrum_distance(spectra[name], spectra["real"]) for name in sets if name != "real"},
        vae_ef=ef_gap(regressor, clips, recon, ef),
        spectra={name: s.mean(0) for name, s in spectra.items()},
        examples=middle, frames={name: len(p) for name, p in pixels.items()})


LABELS = {"real": "real (held out)", "reconstructed": "VAE reconstruction", "released": "released (generated)",
          "real_floor": "real, other split"}


def texture_figure(report: TextureReport, path: Path) -> None:
    """Real, reconstructed and released middle frames side by side, and the mean spectra: a PNG at ``path``."""
    from matplotlib.figure import Figure

    rows = ["real", "reconstructed", "released"]
    cols = min(len(report.examples[name]) for name in rows)
    fig = Figure(figsize=(1.3 * cols + 4.2, 1.35 * len(rows)))
    grid = fig.add_gridspec(len(rows), cols + 3)
    for r, name in enumerate(rows):
        for c in range(cols):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(report.examples[name][c], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(LABELS[name], fontsize=7)
    ax = fig.add_subplot(grid[:, cols:])
    for name, spectrum in report.spectra.items():
        ax.plot(np.arange(1, len(spectrum) + 1), spectrum, label=LABELS[name], lw=1.2)
    ax.set_xlabel("ring (cycles per frame)", fontsize=7)
    ax.set_ylabel("log share of power", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.yaxis.set_label_position("right")
    ax.yaxis.tick_right()
    ax.legend(fontsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    png_base64(fig, path=path)
