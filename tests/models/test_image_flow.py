import pytest
import torch

from echoflow.errors import EchoFlowError
from echoflow.models.flow import flow_matching_loss, sample
from echoflow.models.image_flow import LatentImageFlow, conditions_on_ef
from tests.models.net_checks import assert_opacus_per_sample_grads, overfit_ratio


def tiny(**kwargs: int) -> LatentImageFlow:
    return LatentImageFlow(channels=(16, 32), heads=2, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [16, 14])
def test_output_shape_matches_latent(size: int) -> None:
    model = LatentImageFlow(channels=(16, 32, 32), heads=2)
    x = torch.randn(2, 4, size, size)
    assert model(x, torch.rand(2)).shape == x.shape


def test_demo_size_is_small() -> None:
    assert 0.5e6 < sum(p.numel() for p in LatentImageFlow().parameters()) < 2e6


def test_site_conditioning_changes_output_and_drop_means_null_class() -> None:
    model = tiny(num_sites=3)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    site0 = model(x, t, site=torch.tensor([0, 0]))
    site1 = model(x, t, site=torch.tensor([1, 1]))
    assert (site0 - site1).abs().max() > 1e-4
    null = model(x, t)
    dropped = model(x, t, site=torch.tensor([1, 1]), drop=torch.tensor([True, False]))
    assert torch.allclose(dropped[0], null[0]) and torch.allclose(dropped[1], site1[1])


def test_unconditional_model_rejects_a_site() -> None:
    with pytest.raises(EchoFlowError, match="num_sites=0"):
        tiny()(torch.randn(1, 4, 8, 8), torch.rand(1), site=torch.tensor([0]))


def test_overfits_a_fixed_batch() -> None:
    assert overfit_ratio(tiny(), torch.randn(4, 4, 8, 8), steps=60) > 10


def test_opacus_per_sample_gradients() -> None:
    model = tiny(num_sites=2)
    assert_opacus_per_sample_grads(
        model, torch.randn(3, 4, 8, 8), torch.rand(3), site=torch.tensor([0, 1, 1]), drop=torch.tensor([0, 0, 1]).bool()
    )


def test_samples_with_guidance() -> None:
    model = tiny(num_sites=2).eval()
    noise = torch.randn(2, 4, 8, 8)
    out = sample(model, noise, steps=2, method="heun", guidance=2.0, site=torch.tensor([0, 1]))
    assert out.shape == noise.shape and torch.isfinite(out).all()


def test_ef_conditioning_changes_output_and_drop_means_null_ef() -> None:
    model = LatentImageFlow(channels=(16, 32), heads=2, ef_embedding="smooth")
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    low, high = model(x, t, ef=torch.tensor([20.0, 20.0])), model(x, t, ef=torch.tensor([70.0, 70.0]))
    assert conditions_on_ef(model) and (low - high).abs().max() > 1e-4
    dropped = model(x, t, ef=torch.tensor([70.0, 70.0]), drop=torch.tensor([True, False]))
    assert torch.allclose(dropped[0], model(x, t)[0]) and torch.allclose(dropped[1], high[1])
    with pytest.raises(EchoFlowError, match="without ef_embedding"):
        tiny()(x, t, ef=torch.tensor([20.0, 20.0]))


def test_ef_conditioned_flow_draws_the_anatomy_of_its_ef() -> None:
    """Frames whose content depends on EF (bright for EF 20-30, dark for 60-70): samples follow the requested EF."""
    torch.manual_seed(0)
    model = LatentImageFlow(channels=(16, 32), heads=2, ef_embedding="smooth")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(150):
        ef = torch.where(torch.rand(16) < 0.5, 20.0, 60.0) + 10 * torch.rand(16)
        frames = torch.where(ef[:, None, None, None] < 45, 1.0, -1.0) + 0.1 * torch.randn(16, 4, 8, 8)
        loss = flow_matching_loss(model, frames, target="x1", schedule="uniform", p_uncond=0.0, ef=ef)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    out = sample(model, torch.randn(8, 4, 8, 8), steps=8, method="heun", target="x1",
                 ef=torch.tensor([25.0] * 4 + [65.0] * 4))
    assert out[:4].mean() > 0.5 and out[4:].mean() < -0.5
