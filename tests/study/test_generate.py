"""The generation recipe's frame sampling (echoflow.study.generate)."""

import torch
from torch import Tensor, nn

from echoflow.study.generate import sample_latent_frames


class Drift(nn.Module):
    """A flow network whose velocity is the requested EF: a frame sampled in one Euler step is noise + EF."""

    def forward(self, x: Tensor, t: Tensor, *, ef: Tensor) -> Tensor:
        return ef[:, None, None, None].expand_as(x)


def test_frames_are_drawn_for_their_own_ef_across_batches() -> None:
    ef = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])
    torch.manual_seed(0)
    frames = sample_latent_frames(Drift(), 5, shape=(1, 2, 2), steps=1, method="euler", target="velocity",
                                  batch_size=2, ef=ef)
    torch.manual_seed(0)
    noise = torch.cat([torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2), torch.randn(1, 1, 2, 2)])
    assert torch.allclose(frames - noise, ef[:, None, None, None].expand_as(frames))
