"""One training loop for every stage: centralized runs and federated clients call the same `Trainer`.

A *stage* (VAE, image flow, re-id, video flow, EF regressor — see `echoflow.stages.objectives`) owns its
networks and says how a batch becomes losses, one loss per optimiser group (the adversarial VAE has two groups:
the autoencoder and its discriminator). The trainer adds what every stage needs: AdamW, gradient clipping, an
EMA of the main network, seed-determinism, progress, MLflow metrics, and resumable checkpoints (the file format
is `echoflow.checkpoints`: safetensors + JSON under a SHA-256 manifest, never pickle).

Determinism: all randomness of step ``s`` (batch choice, noise, flow times, augmentations) is drawn after
seeding torch and numpy with ``(seed, s)``, so a run resumed from step k equals an uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import Dataset, default_collate

from echoflow.checkpoints import flatten_state, load_checkpoint, save_checkpoint, unflatten_state
from echoflow.errors import EchoFlowError
from echoflow.progress import progress_bar

Batch = dict[str, Tensor]
TensorList = tuple[Tensor, ...] | list[Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every stage.

    Attributes:
        steps: total optimiser steps of this run (a federated round passes its local steps).
        batch_size: samples per step. lr, weight_decay: AdamW. grad_clip: max global grad norm (0 = off).
        ema_decay: EMA of the main network's weights (0 = off); sampling uses the EMA weights.
        checkpoint_every: steps between checkpoints (0 = only at the end). log_every: steps between metrics.
        seed: the run's seed. amp: bfloat16 autocast on CUDA (ignored on CPU).
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    checkpoint_every: int = 0
    log_every: int = 25
    seed: int = 0
    amp: bool = True


class Stage(Protocol):
    """What the trainer needs of a stage: networks by optimiser group and a loss per group."""

    name: str

    def groups(self) -> dict[str, nn.Module]:
        """Networks by optimiser group; ``"model"`` is the main one (EMA'd, checkpointed, federated)."""
        ...

    def loss(self, group: str, batch: Batch, *, step: int) -> tuple[Tensor, dict[str, float]]:
        """The scalar loss that trains ``group`` on ``batch``, and values to log.

        Called once per group per step, in `groups()` order, each followed at once by its backward and
        optimiser step — so a group's forward and backward are never interleaved with another's (Opacus'
        per-sample hooks rely on that). A stage may cache work for later groups of the same step
        (the VAE passes its reconstruction to the discriminator).
        """
        ...


def ema_with_warmup(decay: float) -> Callable[[TensorList, TensorList, Tensor | int], None]:
    """EMA update whose decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates.

    A fixed decay of 0.999 would keep 0.999**1200 = 30 % of the random initial weights after a 1,200-step demo
    run; the ramp forgets them within the first few hundred steps.
    """

    def update(averaged: TensorList, current: TensorList, num_averaged: Tensor | int) -> None:
        n = int(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(averaged, current, weight)

    return update


def set_step_seed(seed: int, step: int) -> None:
    """Seed torch and numpy from ``(seed, step)`` so every step's randomness is reproducible on resume."""
    mixed = (seed * 1_000_003 + step) % (2**31)
    torch.manual_seed(mixed)
    np.random.seed(mixed)  # noqa: NPY002 -- seeds legacy-RNG users (e.g. augmentations) too


def random_batches(dataset: Dataset[Batch], *, batch_size: int) -> Callable[[], Batch]:
    """A function drawing one uniformly random batch (without replacement) under the current torch seed."""
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise EchoFlowError("training: the dataset is empty")

    def draw() -> Batch:
        index = torch.randperm(n)[: min(batch_size, n)]
        return default_collate([dataset[int(i)] for i in index])

    return draw


class Trainer:
    """AdamW + clipping + EMA around a `Stage`; `state_dict()` holds everything a resume needs."""

    def __init__(self, stage: Stage, config: TrainConfig, *, device: str | torch.device = "cpu") -> None:
        self.stage, self.config, self.device = stage, config, torch.device(device)
        self.step = 0
        for net in stage.groups().values():
            net.to(self.device)
        self.optimizers = {
            name: torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
            for name, net in stage.groups().items()
        }
        self.ema: AveragedModel | None = None
        if config.ema_decay > 0:
            self.ema = AveragedModel(self.model, multi_avg_fn=ema_with_warmup(config.ema_decay))

    @property
    def model(self) -> nn.Module:
        """The stage's main network."""
        return self.stage.groups()["model"]

    def averaged_model(self) -> nn.Module:
        """The EMA weights when kept, else the live network."""
        return self.ema.module if self.ema is not None else self.model

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimiser step of every group on ``batch``; returns the logged values."""
        batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        autocast = self.config.amp and self.device.type == "cuda"
        values: dict[str, float] = {}
        for name, optimizer in self.optimizers.items():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, logged = self.stage.loss(name, batch, step=self.step)
            loss.backward()
            if self.config.grad_clip > 0:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
            optimizer.step()
            values |= {name: float(loss.detach())} | logged
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        if not all(math.isfinite(v) for v in values.values()):
            raise EchoFlowError(f"training {self.stage.name}: non-finite loss at step {self.step}: {values}")
        return values

    def fit(
        self,
        draw: Callable[[], Batch],
        *,
        steps: int | None = None,
        checkpoint_dir: Path | None = None,
        on_metrics: Callable[[int, dict[str, float]], None] | None = None,
        quiet: bool = False,
    ) -> dict[str, float]:
        """Train until ``steps`` (default ``config.steps``) total steps; returns the mean of the last log window.

        ``draw()`` returns one batch; it is called after `set_step_seed`, so it may be random. Checkpoints are
        written every ``config.checkpoint_every`` steps and at the end when ``checkpoint_dir`` is given.
        """
        total = self.config.steps if steps is None else steps
        window: list[dict[str, float]] = []
        with progress_bar(f"train {self.stage.name}", total=total, completed=self.step, quiet=quiet) as advance:
            while self.step < total:
                set_step_seed(self.config.seed, self.step)
                window.append(self.train_step(draw()))
                advance(1)
                if self.step % self.config.log_every == 0 or self.step == total:
                    means = _mean(window)
                    window = [] if self.step < total else window
                    if on_metrics is not None:
                        on_metrics(self.step, means)
                every = self.config.checkpoint_every
                if checkpoint_dir is not None and every > 0 and self.step % every == 0:
                    self.save(checkpoint_dir)
        if checkpoint_dir is not None:
            self.save(checkpoint_dir)
        return _mean(window)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: step, networks, EMA, optimiser states."""
        state: dict[str, Any] = {
            "step": self.step,
            "groups": {name: net.state_dict() for name, net in self.stage.groups().items()},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()`."""
        self.step = int(state["step"])
        for name, net in self.stage.groups().items():
            net.load_state_dict(state["groups"][name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])

    def save(self, directory: Path) -> Path:
        """Write ``checkpoint.safetensors`` + ``checkpoint.json`` into ``directory`` atomically."""
        tensors, meta = flatten_state(self.state_dict())
        meta["config"] = asdict(self.config)
        meta["stage"] = self.stage.name
        return save_checkpoint(directory, tensors, meta)

    def resume(self, directory: Path) -> bool:
        """Load the checkpoint in ``directory`` if there is one; returns whether it did."""
        if not (directory / "checkpoint.json").exists():
            return False
        tensors, meta = load_checkpoint(directory)
        if meta.get("stage") != self.stage.name:
            raise EchoFlowError(f"{directory}: checkpoint is for stage {meta.get('stage')!r}, not {self.stage.name!r}")
        self.load_state_dict(unflatten_state(tensors, meta))
        return True


def _mean(window: list[dict[str, float]]) -> dict[str, float]:
    keys = window[0].keys() if window else ()
    return {k: float(np.mean([w[k] for w in window])) for k in keys}
