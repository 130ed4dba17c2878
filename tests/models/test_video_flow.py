import pytest
import torch
from torch import Tensor

from echoflow.errors import EchoFlowError
from echoflow.models.video_flow import LatentVideoFlow, animate
from tests.models.net_checks import assert_opacus_per_sample_grads, overfit_ratio


def tiny() -> LatentVideoFlow:
    return LatentVideoFlow(channels=(16, 32), heads=2)


@pytest.mark.parametrize("size", [16, 14])
def test_output_shape_matches_clip(size: int) -> None:
    model = LatentVideoFlow(channels=(16, 32, 32), heads=2)
    x = torch.randn(2, 4, 5, size, size)
    assert model(x, torch.rand(2), first_frame=x[:, :, 0], ef=torch.tensor([30.0, 60.0])).shape == x.shape


def test_demo_size_is_small() -> None:
    assert 0.3e6 < sum(p.numel() for p in LatentVideoFlow().parameters()) < 2e6


def test_ef_and_first_frame_condition_the_output() -> None:
    model = tiny()
    x, t = torch.randn(2, 4, 4, 8, 8), torch.rand(2)
    frame = torch.randn(2, 4, 8, 8)
    ef30 = model(x, t, first_frame=frame, ef=torch.tensor([30.0, 30.0]))
    ef60 = model(x, t, first_frame=frame, ef=torch.tensor([60.0, 60.0]))
    assert (ef30 - ef60).abs().max() > 1e-4
    assert (model(x, t, first_frame=-frame, ef=torch.tensor([30.0, 30.0])) - ef30).abs().max() > 1e-4
    null = model(x, t, first_frame=frame)
    dropped = model(x, t, first_frame=frame, ef=torch.tensor([60.0, 60.0]), drop=torch.tensor([True, False]))
    assert torch.allclose(dropped[0], null[0]) and torch.allclose(dropped[1], ef60[1])


def test_mismatched_first_frame_is_a_readable_error() -> None:
    with pytest.raises(EchoFlowError, match="first_frame"):
        tiny()(torch.randn(1, 4, 4, 8, 8), torch.rand(1), first_frame=torch.randn(1, 4, 6, 6))


def test_overfits_a_fixed_batch() -> None:
    clips = torch.randn(2, 4, 4, 8, 8)
    ratio = overfit_ratio(tiny(), clips, steps=60, lr=1e-2, first_frame=clips[:, :, 0], ef=torch.tensor([35.0, 65.0]))
    assert ratio > 10


def test_opacus_per_sample_gradients() -> None:
    clips = torch.randn(3, 4, 4, 8, 8)
    assert_opacus_per_sample_grads(
        tiny(), clips, torch.rand(3), first_frame=clips[:, :, 0], ef=torch.tensor([20.0, 50.0, 70.0]),
        drop=torch.tensor([False, True, False]),
    )


def test_animate_chains_windows_on_the_frame_at_each_start_and_crossfades_the_overlap() -> None:
    windows = 0

    class Ramp:
        """Motion (x1) prediction: frame j = conditioning frame + j, plus 100 in every window after the first."""

        motion_scale = 1.0
        from_motion = LatentVideoFlow.from_motion

        def __call__(self, x: Tensor, t: Tensor, *, first_frame: Tensor, ef: Tensor) -> Tensor:
            nonlocal windows
            windows += 1
            j = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1)
            return (j + 100.0 * (windows > 1)).expand_as(x)

    ramp = Ramp()
    first = torch.randn(2, 4, 3, 3)
    clip = animate(ramp, first, torch.tensor([40.0, 55.0]), frames=14, steps=1, target="x1", window=8, overlap=3)
    assert clip.shape == (2, 4, 14, 3, 3) and windows == 3
    # windows start at 0, 5, 10; each starts on the already generated frame there (weight 0 for the new one)
    third = 100.0 / 3
    offsets = torch.tensor([0.0] * 6 + [third, 2 * third, 100, 100, 100, 100 + third, 100 + 2 * third, 200])
    expected = first.unsqueeze(2) + torch.arange(14.0).view(1, 1, -1, 1, 1) + offsets.view(1, 1, -1, 1, 1)
    assert torch.allclose(clip, expected, atol=1e-4)


@pytest.mark.parametrize("frames", [3, 8, 13])
def test_animate_with_a_network_returns_the_requested_frames(frames: int) -> None:
    model = tiny().eval()
    first = torch.randn(2, 4, 8, 8)
    clip = animate(model, first, torch.tensor([30.0, 60.0]), frames=frames, steps=2, guidance=1.5, window=6, overlap=2)
    assert clip.shape == (2, 4, frames, 8, 8) and torch.isfinite(clip).all()


def test_animate_rejects_overlap_not_below_window() -> None:
    with pytest.raises(EchoFlowError, match="overlap"):
        animate(tiny(), torch.randn(1, 4, 8, 8), torch.tensor([50.0]), frames=20, steps=1, window=4, overlap=4)
