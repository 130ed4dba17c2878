"""Texture fidelity: the radially averaged power spectrum, its distance, and the VAE/released-video report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import Tensor, nn
from typer.testing import CliRunner

from echoflow.cli import app
from echoflow.config import load_config, plain
from echoflow.data.phantom import generate_cohort
from echoflow.data.sites import SiteData, load_sites
from echoflow.errors import EchoFlowError
from echoflow.models.vae import AdversarialVAE
from echoflow.stages.networks import build_network, save_network
from echoflow.study.texture import rapsd, spectrum_distance, texture_report

RNG = np.random.default_rng(0)


def noise(n: int = 16, size: int = 32) -> np.ndarray:
    return RNG.normal(size=(n, size, size))


def blur(frames: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    return gaussian_filter(frames, sigma=(0, sigma, sigma), mode="wrap")


def test_white_noise_has_a_flat_spectrum_and_gain_does_not_count() -> None:
    frames = noise(64)
    spectrum = rapsd(frames).mean(0)
    assert spectrum.shape == (16,)
    assert np.ptp(spectrum) < 0.25  # each ring's share is within ~25 % of the others
    assert rapsd(3.0 * frames + 7.0) == pytest.approx(rapsd(frames))


def test_a_blurred_image_loses_its_high_frequencies() -> None:
    spectrum = rapsd(blur(noise())).mean(0)
    assert spectrum[-4:].mean() < spectrum[:4].mean() - 5.0  # e^-5: under 1 % of the low rings' power
    assert np.all(np.diff(spectrum[2:]) < 0)


def test_a_set_is_at_zero_from_itself_and_a_blurred_copy_is_farther_than_a_fresh_draw() -> None:
    textured = blur(noise(), 0.5)
    spectra = rapsd(textured)
    assert spectrum_distance(spectra, spectra).all == 0.0
    fresh = spectrum_distance(rapsd(blur(noise(), 0.5)), spectra)  # same process: same spectrum shape
    blurred = spectrum_distance(rapsd(blur(textured, 1.0)), spectra)
    assert blurred.all > 10 * fresh.all and blurred.high > blurred.all > 0.5


def test_bad_shapes_are_readable_errors() -> None:
    with pytest.raises(EchoFlowError, match="frames"):
        rapsd(np.zeros((4, 2, 2)))
    with pytest.raises(EchoFlowError, match="spectra"):
        spectrum_distance(np.zeros((2, 8)), np.zeros((2, 4)))


class PixelCodec(nn.Module):
    """A 'VAE' whose latent is the clip itself, decoded through an optional Gaussian blur (pixels)."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def encode_latent(self, x: Tensor) -> Tensor:
        return x

    def decode_latent(self, z: Tensor) -> Tensor:
        if self.sigma == 0:
            return z
        return torch.from_numpy(gaussian_filter(z.numpy(), sigma=(0, 0, 0, self.sigma, self.sigma))).float()


class MeanBrightness(nn.Module):
    """An 'EF regressor' reading the clip's mean intensity: blur changes it a little, identity not at all."""

    def forward(self, clips: Tensor) -> Tensor:
        return 50.0 + 100.0 * clips.mean((1, 2, 3, 4))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate_cohort(tmp_path_factory.mktemp("phantom"), sites=1, patients_per_site=8, seed=0)


def sites(roots: list[Path], split: str) -> list[SiteData]:
    return load_sites(roots, size=32, splits=[split])


def test_a_lossless_codec_keeps_texture_and_ef_and_a_blurring_one_does_not(phantom: list[Path]) -> None:
    real, floor, released = sites(phantom, "TEST"), sites(phantom, "VAL"), sites(phantom, "TRAIN")
    reports = {sigma: texture_report(cast(AdversarialVAE, PixelCodec(sigma)), MeanBrightness(), real, floor, released,
                                     frames=8, fps=12.5) for sigma in (0.0, 1.5)}
    exact, blurred = reports[0.0], reports[1.5]
    assert exact.distance["reconstructed"].all == 0.0 and exact.vae_ef["mae_between"] == 0.0
    assert exact.vae_ef["mae_reconstructed"] == exact.vae_ef["mae_original"]
    floor_distance = exact.distance["real_floor"].high
    assert blurred.distance["reconstructed"].high > 5 * floor_distance and blurred.vae_ef["mae_between"] > 0
    assert blurred.distance["released"] == exact.distance["released"]  # released videos are not re-decoded
    assert exact.examples["real"].dtype == np.uint8 and exact.examples["real"].shape[1:] == (32, 32)


def test_cli_evaluate_texture_writes_the_report_and_the_figure(phantom: list[Path], tmp_path: Path) -> None:
    """Untrained tiny networks on a phantom in the workdir: the command runs end to end."""
    overrides = ["data.sites=1", "data.patients_per_site=8", "data.size=32", "model.vae.base_channels=8",
                 "model.ef.channels=[4,8,8,8]", f"workdir={tmp_path}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]
    cfg = load_config(overrides)
    for name in ("vae", "ef"):
        save_network(build_network(name, plain(cfg.model)), tmp_path / name / "model.safetensors")
    result = CliRunner().invoke(app, ["evaluate", "texture", *overrides, "--videos", str(phantom[0])])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "texture.json").read_text())
    assert set(report["distance"]) == {"reconstructed", "released", "real_floor"}
    assert report["distance"]["reconstructed"]["all"] > report["distance"]["real_floor"]["all"]  # untrained VAE
    assert (tmp_path / "texture.png").stat().st_size > 1000 and "RAPSD" in result.output
