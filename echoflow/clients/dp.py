"""Differential privacy for one site: DP-SGD (Opacus) with a privacy ledger that spans the whole run.

Guarantee: each site's released updates are (ε, δ)-DP with respect to adding or removing one of its training
examples, over every round the site takes part in. The noise multiplier is calibrated ONCE, when the site first
trains, for the planned total of steps (rounds × local steps); the accountant then carries its history from
round to round (and, through `PrivacyLedger.state_dict`, across restarts), so the ε a site reports is
cumulative. Before each round the site checks that the round's steps still fit the target; if not it trains
no more.

Several optimiser groups (the adversarial VAE's autoencoder and its discriminator) see the same Poisson batch
in one step. Each group clips per-sample gradients to ``C`` and adds Gaussian noise of std ``σ·√k·C`` (k groups),
so the step's joint release has L2 sensitivity ``√k·C`` and noise multiplier σ: ONE subsampled Gaussian
mechanism per step, which is what the single accountant counts. The discriminator, which sees real data, is
therefore covered by the same guarantee as the autoencoder.

What a stage must do for DP: a forward through another group's network whose output is detached must run
under ``torch.no_grad()`` (Opacus counts forwards and backwards per layer), batch statistics are not
allowed (GroupNorm, not BatchNorm), and no second gradient pass (the VAE's adaptive GAN weight) is used.

Speed: `make_private` uses Opacus through `echoflow.clients.dp_engine` (grouped-convolution per-sample
gradients, output-tensor hooks, no discarded summed weight gradients, vectorised clipping and noise) — the same
mechanism, so the same (σ, q, steps) and ε; ``benchmarks/federation.py`` prints the step-time ratio per network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from echoflow.clients.dp_engine import FastDPOptimizer, FastGradSampleModule
from echoflow.errors import EchoFlowError
from echoflow.stages.trainer import Batch, Stage, Trainer


@dataclass(frozen=True)
class DPConfig:
    """Per-site DP-SGD target.

    Attributes:
        epsilon: target ε over the whole run (all rounds).
        delta: target δ; 0 means ``0.1 / n_site`` (below 1/n, as DP requires).
        max_grad_norm: per-sample L2 clipping norm C, per optimiser group.
    """

    epsilon: float
    delta: float = 0.0
    max_grad_norm: float = 1.0

    def delta_for(self, n_examples: int) -> float:
        """The δ used for a site with ``n_examples`` training examples."""
        return self.delta if self.delta > 0 else 0.1 / max(n_examples, 1)


class PrivacyLedger:
    """A site's privacy spending: fixed (σ, q) and an RDP accountant whose history survives rounds and restarts.

    Args:
        epsilon: target ε. delta: target δ.
        noise_multiplier: σ of the joint per-step mechanism (see module docstring).
        sample_rate: Poisson sampling rate q = expected batch size / n_site.
    """

    def __init__(self, *, epsilon: float, delta: float, noise_multiplier: float, sample_rate: float) -> None:
        self.epsilon_target, self.delta = epsilon, delta
        self.noise_multiplier, self.sample_rate = noise_multiplier, sample_rate
        self.accountant = RDPAccountant()

    @classmethod
    def calibrate(cls, config: DPConfig, *, n_examples: int, batch_size: int, planned_steps: int) -> PrivacyLedger:
        """Calibrate σ once so that ``planned_steps`` Poisson steps spend exactly the target (ε, δ)."""
        if n_examples < 1 or planned_steps < 1:
            raise EchoFlowError(f"dp: cannot calibrate for {n_examples} examples and {planned_steps} steps")
        delta = config.delta_for(n_examples)
        sample_rate = min(1.0, batch_size / n_examples)
        sigma = get_noise_multiplier(
            target_epsilon=config.epsilon, target_delta=delta, sample_rate=sample_rate, steps=planned_steps
        )
        return cls(epsilon=config.epsilon, delta=delta, noise_multiplier=float(sigma), sample_rate=sample_rate)

    @property
    def steps(self) -> int:
        """DP steps taken so far."""
        return sum(int(n) for _, _, n in self.accountant.history)

    def epsilon(self) -> float:
        """ε spent so far at the ledger's δ."""
        return float(self.accountant.get_epsilon(self.delta)) if self.accountant.history else 0.0

    def projected_epsilon(self, steps: int) -> float:
        """ε after ``steps`` more steps at the ledger's (σ, q)."""
        future = RDPAccountant()
        future.history = [*self.accountant.history, (self.noise_multiplier, self.sample_rate, steps)]
        return float(future.get_epsilon(self.delta))

    def can_spend(self, steps: int) -> bool:
        """Whether ``steps`` more steps keep ε within the target."""
        return self.projected_epsilon(steps) <= self.epsilon_target

    def count_step(self, _optimizer: DPOptimizer | None = None) -> None:
        """Record one joint DP step (used as the main group's DPOptimizer step hook)."""
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: targets, (σ, q) and the accountant history."""
        return {
            "epsilon_target": self.epsilon_target,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "history": [list(h) for h in self.accountant.state_dict()["history"]],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`."""
        self.epsilon_target, self.delta = float(state["epsilon_target"]), float(state["delta"])
        self.noise_multiplier, self.sample_rate = float(state["noise_multiplier"]), float(state["sample_rate"])
        history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        self.accountant.load_state_dict({"history": history, "mechanism": RDPAccountant.mechanism()})

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrivacyLedger:
        """A ledger restored from a `state_dict()`."""
        ledger = cls(epsilon=0.0, delta=0.0, noise_multiplier=0.0, sample_rate=0.0)
        ledger.load_state_dict(state)
        return ledger


class PrivateStage:
    """Wraps a stage for DP-SGD: per-sample hooks only on the group being trained, noise-only empty steps.

    A group's loss may call another group's network (the VAE's generator loss runs the discriminator on the
    reconstruction); that network's per-sample gradients would be thrown away by its own optimiser's
    ``zero_grad``, so its hooks are off then. Poisson sampling draws no example with probability (1-q)^n.
    Skipping that step would reveal the draw; instead every group gets zero per-sample gradients and its
    DPOptimizer adds noise as usual.
    """

    def __init__(self, stage: Stage, hooks: dict[str, GradSampleModule]) -> None:
        self.stage, self.name, self.hooks = stage, stage.name, hooks

    def groups(self) -> dict[str, nn.Module]:
        """The wrapped stage's groups."""
        return self.stage.groups()

    def loss(self, group: str, batch: Batch, *, step: int) -> tuple[Tensor, dict[str, float]]:
        """The stage's loss, or a zero loss with empty per-sample gradients when the batch is empty."""
        for name, hooks in self.hooks.items():
            hooks.hooks_enabled = name == group
        if batch_size_of(batch) > 0:
            return self.stage.loss(group, batch, step=step)
        params = [p for p in self.groups()[group].parameters() if p.requires_grad]
        for p in params:
            p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]
        return torch.stack([(p * 0).sum() for p in params]).sum(), {}


def batch_size_of(batch: Batch) -> int:
    """Examples in ``batch`` (first dimension of its first tensor)."""
    return next((len(v) for v in batch.values() if isinstance(v, Tensor)), 0)


def poisson_batches(dataset: Dataset[Batch], *, sample_rate: float) -> Callable[[], Batch]:
    """A ``draw()`` that includes each example independently with probability ``sample_rate`` (current seed)."""
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise EchoFlowError("dp: the site's training set is empty")
    example = dataset[0]

    def draw() -> Batch:
        index = torch.nonzero(torch.rand(n) < sample_rate).flatten()
        if len(index) == 0:
            return {k: v.new_empty((0, *v.shape)) for k, v in example.items() if isinstance(v, Tensor)}
        return default_collate([dataset[int(i)] for i in index])

    return draw


def make_private(trainer: Trainer, ledger: PrivacyLedger, *, max_grad_norm: float, batch_size: int) -> None:
    """Turn ``trainer``'s groups into DP-SGD in place: per-sample gradients, clipping, noise, accounting.

    Args:
        trainer: a fresh `Trainer` (its optimisers are wrapped; its config should have ``grad_clip=0``).
        ledger: the site's ledger; its accountant counts one step per trainer step.
        max_grad_norm: per-sample clipping norm C of every group.
        batch_size: expected Poisson batch size (the mean-loss denominator).
    """
    groups = trainer.stage.groups()
    hooks: dict[str, GradSampleModule] = {}
    for name, net in groups.items():
        problems = ModuleValidator.validate(net, strict=False)
        if problems:
            raise EchoFlowError(f"dp: group {name!r} cannot be trained with DP-SGD: {problems[0]}")
        # hooks live on net's layers; the stage calls net itself
        hooks[name] = FastGradSampleModule(net, loss_reduction="mean")
    sigma = ledger.noise_multiplier * math.sqrt(len(groups))
    for name in list(trainer.optimizers):
        dp_optimizer = FastDPOptimizer(
            trainer.optimizers[name], noise_multiplier=sigma, max_grad_norm=max_grad_norm,
            expected_batch_size=batch_size,
        )
        if name == "model":
            dp_optimizer.attach_step_hook(ledger.count_step)
        trainer.optimizers[name] = dp_optimizer
    trainer.stage = PrivateStage(trainer.stage, hooks)
