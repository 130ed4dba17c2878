"""Differential privacy for one site: patient-level DP-SGD (Opacus) and ONE privacy ledger for the whole run.

Unit of privacy: the patient. Each step Poisson-samples the site's *patients* (rate q = expected batch size /
patients) and takes ONE random item (frame, clip, pair) of each sampled patient, so per-sample clipping to C
bounds what one patient — all their videos, frames and transformed twins — changes in a step. A site's
released updates are then (ε, δ)-DP with respect to adding or removing one of its patients, over every round
and every stage the site takes part in (δ defaults to 0.1 / the site's patients).

Budget: one RDP accountant per site for the whole run. The site's policy (`echoflow.clients.policy`) splits the
target ε over the stages by its ``dp-plan``; when stage s begins, its noise multiplier σ_s is calibrated so that
the history so far plus the stage's planned steps spends exactly ε × (the shares of the stages begun so far,
s included). So each stage is calibrated to its share, the cumulative ε after the last stage is ≤ the target,
and a stage can never eat a later stage's share. Before each round the site checks that the round's steps still
fit; if not it trains no more (and the server stops the run: `echoflow.server.loop`).

Randomness: the Poisson draw, the choice of a patient's item and the Gaussian noise come from a generator the
server cannot know (`echoflow.clients.policy.secret_generator`): otherwise the server could subtract the noise.

Several optimiser groups (the adversarial VAE's autoencoder and its discriminator) see the same Poisson batch
in one step. Each group clips per-sample gradients to ``C`` and adds Gaussian noise of std ``σ·√k·C`` (k groups),
so the step's joint release has L2 sensitivity ``√k·C`` and noise multiplier σ: ONE subsampled Gaussian
mechanism per step, which is what the single accountant counts. The discriminator, which sees real data, is
therefore covered by the same guarantee as the autoencoder.

What a stage must do for DP: a forward through another group's network whose output is detached must run
under ``torch.no_grad()`` (Opacus counts forwards and backwards per layer), batch statistics are not
allowed (GroupNorm, not BatchNorm), and no second gradient pass (the VAE's adaptive GAN weight) is used. A loss
that couples a batch's items (re-id's InfoNCE: the other patients are negatives) gets batch-level clipping
instead (`echoflow.clients.dp_batch`): per-item clipping would bound nothing per patient there.

Speed: `make_private` uses Opacus through `echoflow.clients.dp_engine` (grouped-convolution or per-tap GEMM
per-sample gradients, output-tensor hooks, no discarded summed weight or bias gradients, vectorised clipping and
noise; the hooked group back-propagates the sum of the items' losses, so no per-layer rescaling) — the same
mechanism, so the same (σ, q, steps) and ε; ``benchmarks/federation.py`` prints the step-time ratio per network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset, Subset, default_collate

from echoflow.clients.dp_batch import COUPLED_STAGES, BatchClippedOptimizer
from echoflow.clients.dp_engine import FastDPOptimizer, FastGradSampleModule
from echoflow.data.sites import ClipDataset, FrameDataset, PatientPairDataset
from echoflow.errors import EchoFlowError
from echoflow.stages.trainer import Batch, Stage, Trainer

#: σ is searched in [SIGMA_MIN, SIGMA_MAX]; a stage needing more noise than SIGMA_MAX has no usable budget.
SIGMA_MIN, SIGMA_MAX = 0.05, 1e4


@dataclass(frozen=True)
class StageMechanism:
    """One stage's subsampled Gaussian mechanism.

    Attributes:
        noise_multiplier: σ of the joint per-step mechanism. sample_rate: q, the patients' Poisson rate.
        planned_steps: the steps σ is calibrated for. share: the stage's share of the site's ε.
        epsilon_cap: the cumulative ε the run may have spent once this stage is done.
    """

    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    share: float
    epsilon_cap: float


class PrivacyLedger:
    """A site's privacy spending over the whole run: one RDP accountant and each stage's mechanism.

    Args:
        epsilon: target ε over the whole run. delta: target δ (fixed for the run).
    """

    def __init__(self, *, epsilon: float, delta: float) -> None:
        self.epsilon_target, self.delta = epsilon, delta
        self.stages: dict[str, StageMechanism] = {}
        self.stage_steps: dict[str, int] = {}
        self.releases: dict[str, dict[str, float]] = {}  # one-off releases kept to answer repeats identically
        self.accountant = RDPAccountant()

    def begin_stage(self, stage: str, *, share: float, sample_rate: float, planned_steps: int) -> StageMechanism:
        """The stage's mechanism, calibrated on first use (see the module docstring); later rounds reuse it."""
        if stage in self.stages:
            return self.stages[stage]
        if planned_steps < 1 or not 0 < sample_rate <= 1:
            raise EchoFlowError(f"dp: cannot calibrate {stage} for {planned_steps} steps at q={sample_rate}")
        cap = self.epsilon_target * min(1.0, sum(m.share for m in self.stages.values()) + share)
        sigma = self._calibrate(sample_rate, planned_steps, cap, stage)
        self.stages[stage] = StageMechanism(noise_multiplier=sigma, sample_rate=sample_rate,
                                            planned_steps=planned_steps, share=share, epsilon_cap=cap)
        self.stage_steps.setdefault(stage, 0)
        return self.stages[stage]

    def _calibrate(self, q: float, steps: int, cap: float, stage: str) -> float:
        """The smallest σ (to 0.1 %) with which ``steps`` more steps keep the cumulative ε within ``cap``."""
        def spent(sigma: float) -> float:
            return self._epsilon_of([*self.accountant.history, *self._reserved(), (sigma, q, steps)])

        if cap <= self.epsilon_target * sum(m.share for m in self.stages.values()) or spent(SIGMA_MAX) > cap:
            raise EchoFlowError(f"dp: stage {stage} has no usable budget (ε {self.epsilon():.3g} already spent "
                                f"of the {cap:.3g} the plan allows once it is done)")
        low, high = SIGMA_MIN, SIGMA_MAX
        if spent(low) <= cap:
            return low
        while high / low > 1.001:
            middle = math.sqrt(low * high)
            low, high = (low, middle) if spent(middle) <= cap else (middle, high)
        return high

    def _reserved(self, *, but: str = "") -> list[tuple[float, float, int]]:
        """The planned steps begun stages (except ``but``) have not taken yet: reserved, as their share is."""
        return [(m.noise_multiplier, m.sample_rate, m.planned_steps - self.stage_steps.get(name, 0))
                for name, m in self.stages.items() if name != but and m.planned_steps > self.stage_steps.get(name, 0)]

    def _epsilon_of(self, history: list[tuple[float, float, int]]) -> float:
        accountant = RDPAccountant()
        accountant.history = list(history)
        return float(accountant.get_epsilon(self.delta)) if history else 0.0

    @property
    def steps(self) -> int:
        """DP steps taken so far, all stages."""
        return sum(int(n) for _, _, n in self.accountant.history)

    def epsilon(self) -> float:
        """ε spent so far (all stages) at the ledger's δ."""
        return self._epsilon_of(list(self.accountant.history))

    def projected_epsilon(self, stage: str, steps: int) -> float:
        """Cumulative ε after ``steps`` more steps of ``stage``'s mechanism (other stages as they are)."""
        m = self.stages[stage]
        return self._epsilon_of([*self.accountant.history, (m.noise_multiplier, m.sample_rate, steps)])

    def can_spend(self, stage: str, steps: int) -> bool:
        """Whether ``steps`` more steps of ``stage`` keep the cumulative ε within the shares of the stages begun.

        The steps other begun stages still have planned count as spent: their shares are reserved.
        """
        m = self.stages[stage]
        cap = self.epsilon_target * min(1.0, sum(s.share for s in self.stages.values()))
        history = [*self.accountant.history, *self._reserved(but=stage), (m.noise_multiplier, m.sample_rate, steps)]
        return self._epsilon_of(history) <= cap * (1 + 1e-9)

    def count_step(self, stage: str) -> None:
        """Record one joint DP step of ``stage``."""
        m = self.stages[stage]
        self.accountant.step(noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate)
        self.stage_steps[stage] = self.stage_steps.get(stage, 0) + 1

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: target, δ, every stage's mechanism and steps, the accountant history."""
        return {
            "epsilon_target": self.epsilon_target,
            "delta": self.delta,
            "stages": {name: asdict(m) for name, m in self.stages.items()},
            "stage_steps": dict(self.stage_steps),
            "releases": {name: dict(values) for name, values in self.releases.items()},
            "history": [list(h) for h in self.accountant.state_dict()["history"]],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`."""
        if "stages" not in state:
            raise EchoFlowError("privacy ledger: written before per-stage budgets; it cannot be read safely")
        self.epsilon_target, self.delta = float(state["epsilon_target"]), float(state["delta"])
        self.stages = {name: StageMechanism(**m) for name, m in state["stages"].items()}
        self.stage_steps = {name: int(n) for name, n in state.get("stage_steps", {}).items()}
        self.releases = {name: {k: float(v) for k, v in values.items()}
                         for name, values in state.get("releases", {}).items()}
        history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        self.accountant.load_state_dict({"history": history, "mechanism": RDPAccountant.mechanism()})

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrivacyLedger:
        """A ledger restored from a `state_dict()`."""
        ledger = cls(epsilon=0.0, delta=0.0)
        ledger.load_state_dict(state)
        return ledger


class PrivateStage:
    """Wraps a stage for DP-SGD: per-sample hooks only on the group being trained, noise-only empty steps.

    A group's loss may call another group's network (the VAE's generator loss runs the discriminator on the
    reconstruction); that network's per-sample gradients would be thrown away by its own optimiser's
    ``zero_grad``, so its hooks are off then. Poisson sampling draws no example with probability (1-q)^n.
    Skipping that step would reveal the draw; instead every group gets zero per-sample gradients and its
    DPOptimizer adds noise as usual.

    A stage's loss is a batch mean, so item i's share of its gradient is 1/n of the item's own gradient. A
    group with per-sample hooks back-propagates n × the loss (the sum of the items' losses; its value is still
    the mean, for the logs), and the hooks, made with ``loss_reduction="sum"``, record each item's own gradient
    with no per-layer rescaling (one multiplication per layer and step saved).
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
        n = batch_size_of(batch)
        if n > 0:
            loss, logged = self.stage.loss(group, batch, step=step)
            if group in self.hooks:  # gradient n x the mean's, value the mean
                loss = loss * n - (loss * (n - 1)).detach()
            return loss, logged
        params = [p for p in self.groups()[group].parameters() if p.requires_grad]
        for p in params:
            p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]
        return torch.stack([(p * 0).sum() for p in params]).sum(), {}


def batch_size_of(batch: Batch) -> int:
    """Examples in ``batch`` (first dimension of its first tensor)."""
    return next((len(v) for v in batch.values() if isinstance(v, Tensor)), 0)


def item_patients(dataset: Dataset[Batch]) -> np.ndarray:
    """The patient of every item of ``dataset`` (an item without a ``patient`` field is its own patient)."""
    if isinstance(dataset, Subset):
        return item_patients(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, ConcatDataset):
        parts = [item_patients(d) for d in dataset.datasets]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if isinstance(dataset, FrameDataset):
        return np.repeat(np.asarray(dataset.table.patient), [len(v) for v in dataset.table.videos])
    if isinstance(dataset, ClipDataset):
        return np.asarray([dataset.table.patient[v] for v in dataset.kept], dtype=np.int64)
    if isinstance(dataset, PatientPairDataset):
        return np.asarray(dataset.table.patient, dtype=np.int64)
    n = len(dataset)  # type: ignore[arg-type]
    if n and "patient" in dataset[0]:
        return np.asarray([int(dataset[i]["patient"]) for i in range(n)], dtype=np.int64)
    return np.arange(n, dtype=np.int64)


def patient_groups(dataset: Dataset[Batch]) -> list[np.ndarray]:
    """Item indices of each patient of ``dataset`` (patients in id order)."""
    patients = item_patients(dataset)
    order = np.argsort(patients, kind="stable")
    cuts = np.flatnonzero(np.diff(patients[order])) + 1
    return [group for group in np.split(order, cuts) if len(group)]


def poisson_batches(
    dataset: Dataset[Batch], *, sample_rate: float, generator: torch.Generator,
) -> Callable[[], Batch]:
    """A ``draw()`` that includes each PATIENT independently with probability ``sample_rate``, one item each.

    One random item (frame, clip, pair) per sampled patient, so per-item clipping is per-patient clipping.
    Both draws use ``generator`` (the site's secret one), never torch's global generator.
    """
    groups = patient_groups(dataset)
    if not groups:
        raise EchoFlowError("dp: the site's training set is empty")
    example = dataset[0]

    def draw() -> Batch:
        chosen = torch.nonzero(torch.rand(len(groups), generator=generator) < sample_rate).flatten().tolist()
        if not chosen:
            return {k: v.new_empty((0, *v.shape)) for k, v in example.items() if isinstance(v, Tensor)}
        picks = torch.randint(2**62, (len(chosen),), generator=generator).tolist()
        return default_collate([dataset[int(groups[p][r % len(groups[p])])] for p, r in zip(chosen, picks,
                                                                                              strict=True)])

    return draw


def make_private(trainer: Trainer, ledger: PrivacyLedger, *, stage: str, max_grad_norm: float, batch_size: float,
                 generator: torch.Generator) -> None:
    """Turn ``trainer``'s groups into DP-SGD in place: per-sample gradients, clipping, noise, accounting.

    Args:
        trainer: a fresh `Trainer` (its optimisers are wrapped; its config should have ``grad_clip=0``).
        ledger: the site's ledger; it counts one step of ``stage``'s mechanism (already begun) per trainer step.
        stage: the stage being trained.
        max_grad_norm: per-sample (per-patient) clipping norm C of every group.
        batch_size: expected Poisson batch size q·patients (the mean-loss denominator).
        generator: the site's secret generator for the noise.
    """
    groups = trainer.stage.groups()
    hooks: dict[str, GradSampleModule] = {}
    if stage in COUPLED_STAGES:  # the loss couples a batch's items: batch-level clipping (`dp_batch`)
        if len(groups) != 1:
            raise EchoFlowError(f"dp: stage {stage} couples its items and has {len(groups)} groups; one is supported")
        name = next(iter(trainer.optimizers))
        trainer.optimizers[name] = BatchClippedOptimizer(  # type: ignore[assignment]
            trainer.optimizers[name], noise_multiplier=ledger.stages[stage].noise_multiplier,
            max_grad_norm=max_grad_norm, generator=generator, on_step=lambda: ledger.count_step(stage))
        trainer.stage = PrivateStage(trainer.stage, hooks)
        return
    for name, net in groups.items():
        problems = ModuleValidator.validate(net, strict=False)
        if problems:
            raise EchoFlowError(f"dp: group {name!r} cannot be trained with DP-SGD: {problems[0]}")
        # hooks live on net's layers; the stage calls net itself
        hooks[name] = FastGradSampleModule(net, loss_reduction="sum")  # PrivateStage sums the items' losses
    sigma = ledger.stages[stage].noise_multiplier * math.sqrt(len(groups))

    def count(_optimizer: DPOptimizer) -> None:
        ledger.count_step(stage)

    for name in list(trainer.optimizers):
        dp_optimizer = FastDPOptimizer(
            trainer.optimizers[name], noise_multiplier=sigma, max_grad_norm=max_grad_norm,
            expected_batch_size=max(batch_size, 1e-6), generator=generator,
        )
        if name == "model":
            dp_optimizer.attach_step_hook(count)
        trainer.optimizers[name] = dp_optimizer
    trainer.stage = PrivateStage(trainer.stage, hooks)
