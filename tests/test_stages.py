from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from echoflow.config import load_config, plain
from echoflow.stages import STAGES
from echoflow.stages.networks import save_network
from echoflow.stages.objectives import build_stage
from echoflow.stages.trainer import Batch, TrainConfig, Trainer
from echoflow.study.models import trained_network

TINY = [
    "model.vae.base_channels=8", "model.discriminator.base_channels=8", "model.image_flow.channels=[8,16]",
    "model.video_flow.channels=[8,16]", "model.reid.channels=8", "model.ef.channels=[4,8,8,8]",
]


def batch_for(name: str) -> Batch:
    g = torch.Generator().manual_seed(0)
    ef = 20 + 60 * torch.rand(4, generator=g)
    if name == "vae":
        return {"frame": torch.rand(4, 1, 32, 32, generator=g) * 2 - 1}
    if name == "image_flow":
        return {"frame": torch.randn(4, 4, 8, 8, generator=g), "site": torch.zeros(4, dtype=torch.long)}
    if name == "reid":
        return {"a": torch.randn(4, 4, 8, 8, generator=g), "b": torch.randn(4, 4, 8, 8, generator=g),
                "patient": torch.tensor([0, 1, 2, 0])}
    if name == "video_flow":
        return {"clip": torch.randn(4, 4, 4, 8, 8, generator=g), "ef": ef}
    return {"clip": torch.rand(4, 1, 4, 32, 32, generator=g) * 2 - 1, "ef": ef}


def trainer(name: str) -> Trainer:
    torch.manual_seed(0)
    cfg = load_config([*TINY, "train.vae.loss.adv_start=2"])
    stage = build_stage(name, plain(cfg.model), plain(cfg.train[name].loss))
    return Trainer(stage, TrainConfig(steps=5, batch_size=4, lr=1e-3, ema_decay=0.9, seed=3))


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_trains_and_resumes_exactly(name: str, tmp_path: Path) -> None:
    data = batch_for(name)
    full = trainer(name)
    full.fit(lambda: data, quiet=True)
    part = trainer(name)
    part.fit(lambda: data, steps=3, checkpoint_dir=tmp_path, quiet=True)  # the VAE's adversarial term is on from 2
    resumed = trainer(name)
    assert resumed.resume(tmp_path)
    resumed.fit(lambda: data, quiet=True)
    for key, value in full.averaged_model().state_dict().items():
        assert torch.equal(value, resumed.averaged_model().state_dict()[key]), key


def test_saved_network_reloads_bit_identical(tmp_path: Path) -> None:
    cfg = load_config([*TINY, f"workdir={tmp_path}"])
    net = trainer("ef").averaged_model()
    save_network(net, tmp_path / "ef" / "model.safetensors")
    clip = batch_for("ef")["clip"]
    assert torch.equal(net.eval()(clip), trained_network(cfg, "ef")(clip))
    assert OmegaConf.select(cfg, "model.ef.channels") == [4, 8, 8, 8]
