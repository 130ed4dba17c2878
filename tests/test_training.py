from pathlib import Path

import torch
from torch import Tensor, nn

from echoflow.stages.trainer import Batch, TrainConfig, Trainer, random_batches


class ToyData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 1

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> Batch:
        return {"x": self.x[i], "y": self.y[i]}


class ToyStage:
    """A regressor plus a second 'adversary' group, with injected noise: exercises every trainer path."""

    name = "toy"

    def __init__(self) -> None:
        self.net = nn.Linear(4, 1)
        self.adv = nn.Linear(1, 1)

    def groups(self) -> dict[str, nn.Module]:
        return {"model": self.net, "disc": self.adv}

    def loss(self, group: str, batch: Batch, *, step: int) -> tuple[Tensor, dict[str, float]]:
        if group == "model":
            self.pred = self.net(batch["x"] + 0.01 * torch.randn_like(batch["x"])).squeeze(-1)
            mse = (self.pred - batch["y"]).pow(2).mean()
            return mse, {"mse": float(mse.detach())}
        return self.adv(self.pred.detach().unsqueeze(-1)).pow(2).mean(), {}


def make(steps: int = 60) -> Trainer:
    torch.manual_seed(0)
    return Trainer(ToyStage(), TrainConfig(steps=steps, batch_size=16, lr=5e-2, ema_decay=0.9, log_every=10))


def test_trainer_learns() -> None:
    trainer = make(200)
    first = trainer.train_step(random_batches(ToyData(), batch_size=16)())["mse"]
    last = trainer.fit(random_batches(ToyData(), batch_size=16), quiet=True)["mse"]
    assert last < first / 10


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    full = make()
    full.fit(random_batches(ToyData(), batch_size=16), quiet=True)

    part = make()
    part.fit(random_batches(ToyData(), batch_size=16), steps=25, checkpoint_dir=tmp_path, quiet=True)
    resumed = make()
    assert resumed.resume(tmp_path) and resumed.step == 25
    resumed.fit(random_batches(ToyData(), batch_size=16), quiet=True)

    for a, b in zip(full.state_dict()["groups"]["model"].values(), resumed.state_dict()["groups"]["model"].values(),
                    strict=True):
        assert torch.equal(a, b)
    assert torch.equal(full.averaged_model().weight, resumed.averaged_model().weight)


def test_checkpoint_round_trip_is_bit_identical(tmp_path: Path) -> None:
    trainer = make(5)
    trainer.fit(random_batches(ToyData(), batch_size=16), checkpoint_dir=tmp_path, quiet=True)
    other = make(5)
    other.resume(tmp_path)
    x = torch.randn(8, 4)
    assert torch.equal(trainer.model(x), other.model(x))
    assert other.optimizers["model"].state_dict()["state"][0]["exp_avg"].equal(
        trainer.optimizers["model"].state_dict()["state"][0]["exp_avg"])


def test_ema_forgets_the_initial_weights() -> None:
    from torch.optim.swa_utils import AveragedModel

    from echoflow.stages.trainer import ema_with_warmup

    net = nn.Linear(1, 1, bias=False)
    ema = AveragedModel(net, multi_avg_fn=ema_with_warmup(0.999))
    with torch.no_grad():
        for step in range(1200):
            net.weight.fill_(float(step))
            ema.update_parameters(net)
    # a fixed 0.999 decay would still hold 30 % of the first weights (about 850 here)
    assert float(ema.module.weight) > 1000
