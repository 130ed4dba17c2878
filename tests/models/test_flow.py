import pytest
import torch
from torch import Tensor

from echoflow.errors import EchoFlowError
from echoflow.models.flow import flow_matching_loss, interpolate, sample, sample_time

MU, SIGMA = 2.0, 0.5


def gaussian_velocity(x: Tensor, t: Tensor) -> Tensor:
    """Exact marginal velocity of the straight path from N(0, 1) to N(MU, SIGMA²), independent coupling.

    x_t ~ N(t·MU, s²(t)) with s² = (1-t)² + t²·SIGMA²; v = x1 - x0 is jointly Gaussian with x_t, so
    E[v | x_t] = MU + Cov(v, x_t) / s² · (x_t - t·MU), Cov = t·SIGMA² - (1 - t).
    """
    t = t.view(-1, *([1] * (x.dim() - 1)))
    var = (1 - t) ** 2 + t**2 * SIGMA**2
    return MU + (t * SIGMA**2 - (1 - t)) / var * (x - t * MU)


def gaussian_x1(x: Tensor, t: Tensor) -> Tensor:
    """The same field as an x1 prediction: x̂1 = x_t + (1 - t)·v."""
    return x + (1 - t.view(-1, 1)) * gaussian_velocity(x, t)


def endpoint_error(method: str, steps: int, *, target: str = "velocity") -> float:
    noise = torch.randn(2048, 1, generator=torch.Generator().manual_seed(0))
    model = gaussian_velocity if target == "velocity" else gaussian_x1
    x1 = sample(model, noise, steps=steps, method=method, target=target)  # type: ignore[arg-type]
    # the ODE flow of this field maps each x0 to MU + SIGMA·x0 exactly
    return (x1 - (MU + SIGMA * noise)).abs().max().item()


def test_euler_on_exact_gaussian_field_matches_closed_form_endpoint() -> None:
    noise = torch.randn(20_000, 1)
    x1 = sample(gaussian_velocity, noise, steps=1000, method="euler")
    assert x1.mean().item() == pytest.approx(MU + SIGMA * noise.mean().item(), abs=1e-3)
    assert x1.std().item() == pytest.approx(SIGMA * noise.std().item(), rel=2e-3)
    assert x1.mean().item() == pytest.approx(MU, abs=0.02)
    assert x1.std().item() == pytest.approx(SIGMA, rel=0.02)


@pytest.mark.parametrize("method", ["heun", "midpoint"])
def test_second_order_methods_beat_euler_at_equal_steps(method: str) -> None:
    euler = endpoint_error("euler", 8)
    second = endpoint_error(method, 8)
    assert second < euler / 10
    # halving the step size cuts a second-order method's error about 4x
    assert endpoint_error(method, 16) < second / 3


@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_x1_target_samples_the_same_flow(method: str) -> None:
    assert endpoint_error(method, 16, target="x1") == pytest.approx(endpoint_error(method, 16), abs=1e-5)


def test_heun_on_x1_target_stays_second_order_without_the_t1_velocity() -> None:
    coarse, fine = endpoint_error("heun", 16, target="x1"), endpoint_error("heun", 32, target="x1")
    assert fine < coarse / 3
    assert fine < endpoint_error("euler", 32) / 10


def test_loss_targets_by_hand() -> None:
    x0, x1 = torch.ones(2, 3), torch.full((2, 3), 3.0)
    t = torch.tensor([0.5, 0.25])
    assert torch.allclose(interpolate(x0, x1, t)[:, 0], torch.tensor([2.0, 1.5]))

    def identity(x: Tensor, t: Tensor) -> Tensor:
        return x

    # outputs x_t = (2, 1.5); velocity target x1 - x0 = 2; x1 target = 3
    velocity = flow_matching_loss(identity, x1, target="velocity", x0=x0, t=t)
    clean = flow_matching_loss(identity, x1, target="x1", x0=x0, t=t)
    assert velocity.item() == pytest.approx((0.0 + 0.25) / 2)
    assert clean.item() == pytest.approx((1.0 + 2.25) / 2)


def test_loss_forwards_conditions_and_drops_with_probability() -> None:
    seen: dict[str, Tensor] = {}

    def model(x: Tensor, t: Tensor, *, ef: Tensor, drop: Tensor) -> Tensor:
        seen.update(ef=ef, drop=drop)
        return x

    ef = torch.rand(10_000)
    flow_matching_loss(model, torch.randn(10_000, 2), p_uncond=0.1, ef=ef)
    assert seen["ef"] is ef
    assert seen["drop"].dtype == torch.bool
    assert seen["drop"].float().mean().item() == pytest.approx(0.1, abs=0.015)


@pytest.mark.parametrize("schedule", ["uniform", "logit_normal"])
def test_sample_time_range_and_shape(schedule: str) -> None:
    t = sample_time(50_000, schedule=schedule)  # type: ignore[arg-type]
    assert t.shape == (50_000,)
    assert 0 <= t.min() and t.max() <= 1
    assert t.median().item() == pytest.approx(0.5, abs=0.01)
    # logit-normal piles up in the middle: std 0.21 against uniform's 0.29
    assert t.std().item() == pytest.approx(0.289 if schedule == "uniform" else 0.209, abs=0.01)


@pytest.mark.parametrize("guidance", [0.0, 1.0, 3.0])
def test_classifier_free_guidance_mixes_cond_and_uncond(guidance: float) -> None:
    calls: list[bool] = []

    def model(x: Tensor, t: Tensor, *, ef: Tensor, drop: Tensor | None = None) -> Tensor:
        calls.append(drop is not None)
        return torch.full_like(x, 5.0) if drop is not None and bool(drop.all()) else ef[:, None].expand_as(x)

    noise = torch.zeros(3, 2)
    out = sample(model, noise, steps=1, guidance=guidance, ef=torch.tensor([1.0, 2.0, 3.0]))
    expected = 5.0 + guidance * (torch.tensor([1.0, 2.0, 3.0]) - 5.0)
    assert torch.allclose(out[:, 0], expected)
    assert calls == ([False] if guidance == 1.0 else [False, True])


def test_bad_arguments_raise_readable_errors() -> None:
    with pytest.raises(EchoFlowError, match=r"flow\.method"):
        sample(gaussian_velocity, torch.zeros(1, 1), steps=4, method="rk4")  # type: ignore[arg-type]
    with pytest.raises(EchoFlowError, match=r"flow\.steps"):
        sample(gaussian_velocity, torch.zeros(1, 1), steps=0)
    with pytest.raises(EchoFlowError, match=r"flow\.schedule"):
        sample_time(3, schedule="cosine")  # type: ignore[arg-type]
