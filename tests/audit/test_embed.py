"""Re-id embeddings of pixel frames and videos: frame choice, provenance, one path for every sample."""

import numpy as np
import pytest
import torch

from echoflow.audit.embed import embed, embed_pixels, embed_videos, frame_batch, pick_frames
from echoflow.errors import EchoFlowError
from echoflow.models.reid import ReidEncoder
from echoflow.models.vae import AdversarialVAE

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def nets() -> tuple[AdversarialVAE, ReidEncoder]:
    """Untrained tiny networks: a fixed random feature map is enough to test plumbing."""
    torch.manual_seed(0)
    return AdversarialVAE(base_channels=8, channel_multipliers=(1, 2)), ReidEncoder(channels=8, dim=16)


def test_pick_frames_every_and_first() -> None:
    video, frame = pick_frames([5, 3], every=2)
    assert video.tolist() == [0, 0, 0, 1, 1] and frame.tolist() == [0, 2, 4, 0, 2]
    video, frame = pick_frames([5, 3], first_only=True)
    assert video.tolist() == [0, 1] and frame.tolist() == [0, 0]
    with pytest.raises(EchoFlowError, match=r"audit\.every"):
        pick_frames([5], every=0)


def test_embed_videos_provenance_and_same_path(nets: tuple[AdversarialVAE, ReidEncoder]) -> None:
    vae, reid = nets
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (6, 32, 32), dtype=np.uint8), rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)]
    got = embed_videos(vae, reid, videos, ["a", "b"], every=2)
    assert got.vectors.shape == (5, 16) and got.vectors.dtype == np.float32
    assert [got.refs.name(i) for i in range(5)] == [("a", 0), ("a", 2), ("a", 4), ("b", 0), ("b", 2)]
    # row 4 is video b frame 2, embedded the same way as a lone pixel frame or its latent
    alone = embed_pixels(vae, reid, frame_batch(videos[1][2:3]))
    np.testing.assert_allclose(got.vectors[4], alone[0], atol=1e-5)
    latent = vae.encode_latent(torch.from_numpy(frame_batch(videos[1][2:3])))
    np.testing.assert_allclose(embed(reid, latent).numpy()[0], alone[0], atol=1e-5)
    assert not np.allclose(got.vectors[0], got.vectors[3], atol=1e-3)  # different frames differ
    first = embed_videos(vae, reid, videos, ["a", "b"], first_only=True)
    np.testing.assert_allclose(first.vectors, got.vectors[[0, 3]], atol=1e-5)


def test_embed_pixels_rejects_bad_shape(nets: tuple[AdversarialVAE, ReidEncoder]) -> None:
    with pytest.raises(EchoFlowError, match=r"\(N, 1, H, W\)"):
        embed_pixels(*nets, np.zeros((2, 32, 32), np.float32))
