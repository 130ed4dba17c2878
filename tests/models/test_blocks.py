import pytest
import torch
import torch.nn.functional as F

from echoflow.models.blocks import Attention, EFEmbedding, EFEmbeddingKind, TemporalConv


def _distances(embedding: EFEmbedding, ef: float, deltas: list[float]) -> list[float]:
    with torch.no_grad():
        base = embedding.features(torch.tensor([ef]))
        return [float((embedding.features(torch.tensor([ef + d])) - base).norm()) for d in deltas]


def test_smooth_ef_features_separate_nearby_efs_less_than_distant_ones() -> None:
    embedding = EFEmbedding(64)
    for ef in (20.0, 35.0, 50.0, 65.0):
        near = _distances(embedding, ef, [0.5, 1.0, 2.0, 4.0, 8.0])
        assert near == sorted(near), f"distance not increasing in |ΔEF| around {ef}: {near}"
        assert near[1] < 0.3 * near[4]  # EF ± 1 is much closer than EF ± 8


def test_smooth_ef_features_are_monotone_in_ef_along_their_linear_coordinate() -> None:
    ef = torch.linspace(0.0, 100.0, 201)
    linear = EFEmbedding(64).features(ef)[:, 0]
    assert (linear.diff() > 0).all()
    assert torch.allclose(linear[[0, 100, 200]], torch.tensor([-2.5, 0.0, 2.5]))


def test_smooth_embedding_is_lipschitz_in_ef_at_init() -> None:
    torch.manual_seed(0)
    embedding = EFEmbedding(64)
    ef = torch.linspace(15.0, 80.0, 131)
    with torch.no_grad():
        out = embedding(ef)
    steps = (out[1:] - out[:-1]).norm(dim=1)  # 0.5-point steps
    span = float((out[-1] - out[0]).norm())
    assert steps.max() < 0.1 * span  # the timestep Fourier embedding: 0.64


@pytest.mark.parametrize("kind", ["smooth", "fourier"])
def test_each_kind_embeds_to_dim(kind: EFEmbeddingKind) -> None:
    assert EFEmbedding(32, kind=kind)(torch.tensor([10.0, 90.0])).shape == (2, 32)


def test_the_timestep_fourier_embedding_is_the_per_video_key_the_smooth_one_replaces() -> None:
    """EF/100 through the timestep embedding: EF 50 vs 51 about as far apart as 50 vs 60 (why it was replaced)."""
    near, far = _distances(EFEmbedding(64, kind="fourier"), 50.0, [1.0, 10.0])
    assert near > 0.5 * far


def test_unknown_kind_is_a_readable_error() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        EFEmbedding(8, kind="linear")  # type: ignore[arg-type]


@pytest.mark.parametrize("stride", [1, 2])
def test_temporal_conv_is_the_3d_convolution_with_a_k_by_1_by_1_kernel(stride: int) -> None:
    torch.manual_seed(0)
    layer = TemporalConv(3, 5, stride=stride)
    x = torch.randn(2, 3, 9, 4, 6)
    expected = F.conv3d(x, layer.conv.weight.unsqueeze(-1), layer.conv.bias, stride=(stride, 1, 1), padding=(1, 0, 0))
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("positions", [False, True])
def test_temporal_attention_sees_frame_order_only_with_positions(positions: bool) -> None:
    torch.manual_seed(0)
    attention = Attention(8, heads=2, video=True, positions=positions)
    clip = torch.randn(1, 8, 6, 3, 3)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted_then_attended = attention(clip[:, :, order])
    attended_then_permuted = attention(clip)[:, :, order]
    assert torch.allclose(permuted_then_attended, attended_then_permuted, atol=1e-5) is not positions


def test_frame_positions_are_for_clips_only() -> None:
    with pytest.raises(ValueError, match="clips"):
        Attention(8, heads=2, video=False, positions=True)
