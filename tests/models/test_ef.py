import pytest
import torch
from torch import Tensor, nn

from echoflow.errors import EchoFlowError
from echoflow.models.ef import EFRegressor, _blur, augment_clip, ef_loss
from tests.models.test_vae import assert_dp_compatible


def beating_clips(ef: Tensor, *, frames: int = 8, size: int = 32) -> Tensor:
    """A disc whose area shrinks by ``ef`` percent at end-systole: (B, 1, T, H, W) in [-1, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    phase = 0.5 - 0.5 * torch.cos(torch.linspace(0, 2 * torch.pi, frames))  # 0 at ED, 1 at ES
    area = 1 - (ef[:, None] / 100) * phase[None]  # (B, T), relative to ED
    radius = 0.7 * area.sqrt()
    disc = torch.sigmoid(12 * (radius[..., None, None] - (xx**2 + yy**2).sqrt()))
    return (2 * disc - 1).unsqueeze(1)


def test_output_is_percent_and_shapes_are_checked() -> None:
    model = EFRegressor()
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 300_000
    pred = model(beating_clips(torch.tensor([30.0, 60.0]), frames=16, size=64))
    assert pred.shape == (2,)
    assert ((pred - 55.0).abs() < 30).all(), pred  # untrained: around the EF prior (the head's weight is random)
    pred.sum().backward()  # ... so the very first step trains the features too, not only the head
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.features.parameters())
    with pytest.raises(EchoFlowError, match="clip"):
        model(torch.zeros(2, 16, 64, 64))


def test_ef_regressor_overfits_tiny_batch() -> None:
    ef = torch.tensor([20.0, 35.0, 50.0, 65.0, 75.0, 45.0])
    clips = beating_clips(ef)
    model = EFRegressor(channels=(8, 16, 32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = ef_loss(model(clips), ef).item()
    for _ in range(80):
        loss = ef_loss(model(clips), ef)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = ef_loss(model(clips), ef).item()
    assert after < before / 10, (before, after)


def test_augment_keeps_shape_and_range_and_is_reproducible() -> None:
    clips = beating_clips(torch.tensor([30.0, 60.0, 45.0]))
    out = augment_clip(clips, torch.Generator().manual_seed(3))
    assert out.shape == clips.shape and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out, augment_clip(clips, torch.Generator().manual_seed(3)))
    assert not torch.allclose(out, clips)
    # The disc is still where it was, roughly: augmentation perturbs texture and position, not the anatomy.
    assert torch.corrcoef(torch.stack([out.flatten(), clips.flatten()]))[0, 1] > 0.8


def _max_edge(clip: Tensor) -> Tensor:
    return (clip[..., 1:] - clip[..., :-1]).abs().max()


def test_augment_components() -> None:
    clips = beating_clips(torch.tensor([50.0]))
    identity = augment_clip(clips, max_gain=0, max_blur_sigma=0, max_noise=0, max_shift=0)
    torch.testing.assert_close(identity, clips, atol=1e-5, rtol=0)
    blurred = augment_clip(clips, max_gain=0, max_blur_sigma=3, max_noise=0, max_shift=0)
    assert _max_edge(blurred) < 0.8 * _max_edge(clips)
    dimmed = augment_clip(clips, max_gain=0.5, max_blur_sigma=0, max_noise=0, max_shift=0)
    ratio = (dimmed + 1) / (clips + 1).clamp_min(1e-3)
    unclipped = (clips > -0.5) & (clips < 0.5)  # where a gain <= 1.5 cannot saturate
    assert unclipped.any() and ratio[unclipped].std() < 1e-3 and not torch.allclose(dimmed, clips)
    with pytest.raises(EchoFlowError, match="clip"):
        augment_clip(torch.zeros(1, 8, 32, 32))


def test_ef_regressor_is_dp_compatible() -> None:
    clips, ef = beating_clips(torch.tensor([30.0, 60.0])), torch.tensor([30.0, 60.0])

    def loss(m: nn.Module) -> Tensor:
        return ef_loss(m(clips), ef)

    assert_dp_compatible(EFRegressor(channels=(8, 16)), loss, 2)


def test_input_blur_reads_every_clip_low_passed_and_ignores_speckle() -> None:
    torch.manual_seed(0)
    sharp, blurred = EFRegressor(channels=(4, 8)), EFRegressor(channels=(4, 8), input_blur=1.5)
    for net in (sharp, blurred):
        nn.init.normal_(net.head.weight, std=1.0)
    blurred.load_state_dict(sharp.state_dict())
    clips = beating_clips(torch.tensor([30.0, 60.0]), size=64)
    # the same weights read a clip exactly as the sharp regressor reads its Gaussian-blurred copy
    torch.testing.assert_close(blurred(clips), sharp(_blur(clips, torch.full((2,), 1.5))))
    # pixel-scale speckle moves the blurred reading far less than the sharp one
    speckled = (clips + 0.3 * torch.randn_like(clips)).clamp(-1, 1)
    assert (blurred(speckled) - blurred(clips)).abs().max() < 0.5 * (sharp(speckled) - sharp(clips)).abs().max()
    with pytest.raises(EchoFlowError, match="input_blur"):
        EFRegressor(input_blur=-1.0)
