"""A toy two-group stage (autoencoder + discriminator) and synthetic per-site data, for federation tests."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

DIM = 4


class ToyStage:
    """``model`` reconstructs x (MSE + fooling ``disc``); ``disc`` tells x from the reconstruction."""

    def __init__(self, name: str = "toy") -> None:
        self.name = name
        self.model = nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Linear(8, DIM))
        self.disc = nn.Linear(DIM, 1)

    def groups(self) -> dict[str, nn.Module]:
        return {"model": self.model, "disc": self.disc}

    def loss(self, group: str, batch: dict[str, Tensor], *, step: int) -> tuple[Tensor, dict[str, float]]:
        x = batch["x"]
        if group == "model":
            recon = self.model(x)
            mse = ((recon - x) ** 2).mean()
            return mse + 0.01 * nn.functional.softplus(-self.disc(recon)).mean(), {"mse": float(mse)}
        with torch.no_grad():  # another group's forward: no Opacus activations left without a backward
            recon = self.model(x)
        real, fake = nn.functional.softplus(-self.disc(x)), nn.functional.softplus(self.disc(recon))
        return (real + fake).mean(), {}


class PointSet(Dataset[dict[str, Tensor]]):
    def __init__(self, x: Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i]}


READ: list[tuple[str, Path]] = []
"""Every ``(task, site folder)`` a site's ``site_data`` was asked for in this process (attack tests read it)."""


class ToyTask:
    label = "toy"

    def build_stage(self, name: str, config: Mapping[str, Any]) -> ToyStage:
        torch.manual_seed(int(config.get("seed", 0)))
        return ToyStage(name)

    def site_data(self, name: str, site_dir: Path, config: Mapping[str, Any]) -> tuple[PointSet, PointSet]:
        READ.append((self.label, site_dir))
        site = int(site_dir.name.split("_")[-1])
        g = torch.Generator().manual_seed(100 + site)
        n = int(config.get("n", 64))
        x = torch.randn(n + 16, DIM, generator=g) + site
        return PointSet(x[:n]), PointSet(x[n:])


class OtherTask(ToyTask):
    """The same toy under another import path: code a site never agreed to run."""

    label = "other"


TASK = ToyTask()
OTHER = OtherTask()
