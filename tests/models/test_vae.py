from collections.abc import Callable

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import Tensor, nn

from echoflow.errors import EchoFlowError
from echoflow.models.vae import (
    AdversarialVAE,
    PatchDiscriminator,
    adaptive_weight,
    adversarial_factor,
    discriminator_loss,
    generator_loss,
    kl_loss,
    measure_latent_scale,
    reconstruction_loss,
)


def assert_dp_compatible(model: nn.Module, batch_loss: Callable[[nn.Module], Tensor], batch_size: int) -> None:
    """Opacus accepts the model and one backward gives every trainable parameter a per-sample gradient."""
    assert ModuleValidator.validate(model, strict=False) == []
    gsm = GradSampleModule(model)
    batch_loss(gsm).backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params
    for name, p in params:
        assert p.grad_sample is not None, name
        assert p.grad_sample.shape == (batch_size, *p.shape), name


def blobs(n: int, size: int, seed: int = 0) -> Tensor:
    """Smooth frames in [-1, 1]: a bright ellipse on a dark background, (n, 1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    c = torch.rand(n, 4, 1, 1, generator=g)
    r = ((xx - (c[:, 0] - 0.5)) / (0.3 + 0.4 * c[:, 2])) ** 2 + ((yy - (c[:, 1] - 0.5)) / (0.3 + 0.4 * c[:, 3])) ** 2
    return (2 * torch.sigmoid(8 * (1 - r)) - 1).unsqueeze(1)


def tiny_vae() -> AdversarialVAE:
    return AdversarialVAE(base_channels=16, channel_multipliers=(1, 2))


def test_shapes_and_downsample() -> None:
    vae = tiny_vae()
    x = blobs(3, 32)
    recon, mean, logvar = vae(x)
    assert vae.downsample == 4
    assert recon.shape == x.shape and mean.shape == logvar.shape == (3, 4, 8, 8)
    paper = AdversarialVAE(base_channels=8, channel_multipliers=(1, 2, 2, 2), patch_size=1)
    assert paper.downsample == 8 and paper.encode(torch.zeros(1, 1, 112, 112)).mean.shape == (1, 4, 14, 14)
    with pytest.raises(EchoFlowError, match="frames"):
        vae.encode(torch.zeros(1, 1, 30, 30))


def test_vae_overfits_tiny_batch() -> None:
    vae = tiny_vae()
    x = blobs(4, 32)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    with torch.no_grad():
        before = reconstruction_loss(vae.decode(vae.encode(x).mode()), x).item()
    for _ in range(100):
        recon, mean, logvar = vae(x)
        loss = reconstruction_loss(recon, x) + 1e-6 * kl_loss(mean, logvar)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = reconstruction_loss(vae.decode(vae.encode(x).mode()), x).item()
    assert after < before / 10, (before, after)


def test_latent_scale_round_trip_for_frames_and_clips() -> None:
    vae = tiny_vae().eval()
    frames = blobs(10, 32)
    scale = measure_latent_scale(vae, frames, batch_size=4)
    assert vae.latent_scale.item() == pytest.approx(scale)
    z = vae.encode_latent(frames)
    assert z.std().item() == pytest.approx(1.0, rel=0.05)
    clips = frames.reshape(2, 5, 1, 32, 32).transpose(1, 2)  # (B, 1, T, H, W)
    zc = vae.encode_latent(clips)
    assert zc.shape == (2, 4, 5, 8, 8)
    torch.testing.assert_close(zc[1, :, 2], z[7])
    torch.testing.assert_close(vae.decode_latent(zc)[1, :, 2], vae.decode(z[7:8] / scale)[0])
    assert "latent_scale" in vae.state_dict()


def test_discriminator_separates_real_from_obviously_fake() -> None:
    disc = PatchDiscriminator(base_channels=16, layers=2)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)

    def fake(n: int) -> Tensor:
        return torch.rand(n, 1, 32, 32, generator=g) * 2 - 1

    for step in range(40):
        loss = discriminator_loss(disc(blobs(16, 32, seed=step)), disc(fake(16)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        real, bad = disc(blobs(32, 32, seed=999)), disc(fake(32))
    assert real.shape == (32, 1, 6, 6)
    assert (real.mean(dim=(1, 2, 3)) > 0).float().mean() > 0.9
    assert (bad.mean(dim=(1, 2, 3)) < 0).float().mean() > 0.9
    assert discriminator_loss(real, bad).item() < 0.2


def test_hinge_and_generator_losses() -> None:
    assert discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert discriminator_loss(torch.zeros(4), torch.zeros(4)).item() == 1.0
    assert generator_loss(torch.tensor([1.0, 3.0])).item() == -2.0
    assert kl_loss(torch.zeros(2, 4), torch.zeros(2, 4)).item() == 0.0
    assert kl_loss(torch.ones(2, 4), torch.zeros(2, 4)).item() == pytest.approx(0.5)


def test_adaptive_weight_balances_gradients() -> None:
    vae, disc = tiny_vae(), PatchDiscriminator(base_channels=8, layers=2)
    x = blobs(2, 32)
    recon, _, _ = vae(x)
    rec, g = reconstruction_loss(recon, x), generator_loss(disc(recon))
    w = adaptive_weight(rec, g, vae.last_layer_weight)
    assert torch.isfinite(w) and w.item() > 0 and not w.requires_grad
    w_half = adaptive_weight(rec, 2 * g, vae.last_layer_weight)
    assert w_half.item() == pytest.approx(w.item() / 2, rel=1e-3)
    assert adaptive_weight(rec, 1e-12 * g, vae.last_layer_weight, max_weight=7.0).item() == 7.0


def test_adversarial_factor_switches_on_after_warmup() -> None:
    assert [adversarial_factor(s, start=3) for s in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_vae_and_discriminator_are_dp_compatible() -> None:
    x = blobs(3, 32)

    def vae_loss(m: nn.Module) -> Tensor:
        recon, mean, logvar = m(x)
        return reconstruction_loss(recon, x) + kl_loss(mean, logvar)

    assert_dp_compatible(tiny_vae(), vae_loss, 3)
    assert_dp_compatible(PatchDiscriminator(base_channels=8), lambda m: m(x).mean(), 3)


def test_adaptive_weight_under_opacus_with_hooks_disabled() -> None:
    vae, disc = tiny_vae(), PatchDiscriminator(base_channels=8, layers=2)
    gsm = GradSampleModule(vae)
    x = blobs(3, 32)
    recon, _, _ = gsm(x)
    rec, g = reconstruction_loss(recon, x), generator_loss(disc(recon))
    gsm.disable_hooks()
    w = adaptive_weight(rec, g, vae.last_layer_weight)
    gsm.enable_hooks()
    (rec + w * g).backward()
    assert all(p.grad_sample.shape[0] == 3 for p in vae.parameters())
