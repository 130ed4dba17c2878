"""One site's work in a round, free of Flower: train the stage from the global weights, or evaluate them.

Training uses the shared `Trainer` (AdamW, no EMA: the federation averages live weights). Without DP, each site
and each round get their own step seeds (site-mixed seed, steps numbered across rounds), so rounds never replay
the same batches and a resumed run replays exactly. Under DP the patients' Poisson draw and the noise come from
the site's secret generator instead (`echoflow.clients.policy.secret_generator`), and the site first checks the
message against its own policy (`ClientSettings.refusal`): a message that would weaken it is refused.

What a DP site sends besides its noised weights (the privacy ledger, README): ε spent, the mechanism's (σ, q, δ,
steps) — all functions of its policy, not of its data — and ``num-examples`` 1 (equal FedAvg weights; the
patient count is not released); no training or evaluation loss.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import nan

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from echoflow.clients.dp import PrivacyLedger, make_private, patient_groups, poisson_batches
from echoflow.clients.policy import secret_generator
from echoflow.clients.settings import ClientSettings
from echoflow.federation.task import group_arrays, load_group_arrays, load_task
from echoflow.stages.trainer import Batch, Stage, TrainConfig, Trainer, random_batches, set_step_seed

log = logging.getLogger(__name__)

CURVE_POINTS = 10
"""Most points of a round's training curve that a site reports (window means of its local steps)."""


@dataclass(frozen=True)
class RoundResult:
    """A site's reply to a training round.

    Attributes:
        arrays: updated weights (``"<group>.<param>"``), or None when the site's privacy budget is spent.
        metrics: without DP num-examples, train-loss, wall-s (seconds), epsilon 0, budget-exhausted 0, and the
            round's training curve: train-loss-curve (mean loss of up to `CURVE_POINTS` consecutive windows of
            local steps) and train-loss-steps (the global step ending each window); under
            DP num-examples 1, epsilon (cumulative over the run, all stages), epsilon-cap (what the plan allows
            once this stage is done), the stage's mechanism (dp-noise-multiplier, dp-sample-rate, dp-delta),
            dp-steps (all stages), dp-stage-steps and budget-exhausted (0/1).
            Under DP no curve is sent: it would be one more unaccounted output of the site's data.
    """

    arrays: dict[str, Tensor] | None
    metrics: dict[str, float | list[float]]


def train_round(
    settings: ClientSettings,
    arrays: Mapping[str, Tensor],
    *,
    server_round: int,
    ledger: PrivacyLedger | None,
    proximal_mu: float = 0.0,
) -> tuple[RoundResult, PrivacyLedger | None]:
    """Train ``settings.local_steps`` steps from ``arrays``; returns the reply and the (updated) ledger.

    Args:
        settings: the site's settings.
        arrays: the global weights, ``"<group>.<param>"``.
        server_round: 1-based round number; steps are numbered across rounds.
        ledger: the site's ledger from earlier rounds (None on its first DP round, or without DP).
        proximal_mu: FedProx μ; each step then pulls the weights toward ``arrays`` by ``lr·μ·(w - w_global)``
            (a data-independent update, so it composes with DP-SGD for free).
    """
    started = time.perf_counter()
    settings.refuse(f"{settings.stage} (round {server_round})")
    task = load_task(settings.task)
    policy = settings.policy
    # the stage is built for the site's own DP decision (the VAE drops its second-gradient-pass GAN weight)
    built = {**settings.config, "dp": {**dict(settings.config.get("dp") or {}), "enabled": policy.enabled}}
    stage = task.build_stage(settings.stage, built)
    load_group_arrays(stage, arrays)
    train, _ = task.site_data(settings.stage, settings.site_dir, settings.config)
    config = TrainConfig(
        steps=server_round * settings.local_steps, batch_size=settings.batch_size, lr=settings.lr,
        grad_clip=0.0 if policy.enabled else 1.0, ema_decay=0.0, log_every=1,
        seed=settings.seed * 1009 + settings.site, amp=False,
    )
    trainer = Trainer(stage, config)
    trainer.step = (server_round - 1) * settings.local_steps
    if proximal_mu > 0:
        _pull_toward(trainer, arrays, strength=settings.lr * proximal_mu)
    if not policy.enabled:
        losses: list[tuple[int, float]] = []
        trainer.fit(random_batches(train, batch_size=settings.batch_size), quiet=True,
                    on_metrics=lambda step, values: losses.append((step, values.get("model", nan))))
        loss = float(np.mean([value for _, value in losses])) if losses else nan  # the round's mean
        metrics = _metrics(n=len(train), loss=loss,  # type: ignore[arg-type]
                           started=started, ledger=None, stage=settings.stage, exhausted=False)
        return RoundResult(group_arrays(stage), {**metrics, **curve(losses)}), ledger
    patients = len(patient_groups(train))
    if ledger is None:
        ledger = PrivacyLedger(epsilon=policy.epsilon, delta=policy.delta_for(patients))
    mechanism = ledger.begin_stage(settings.stage, share=policy.plan[settings.stage],
                                   sample_rate=min(1.0, settings.batch_size / max(patients, 1)),
                                   planned_steps=policy.planned_steps[settings.stage])
    if not ledger.can_spend(settings.stage, settings.local_steps):
        return RoundResult(None, _metrics(n=0, loss=0.0, started=started, ledger=ledger, stage=settings.stage,
                                          exhausted=True)), ledger
    generator = secret_generator(policy, stage=settings.stage, server_round=server_round)
    make_private(trainer, ledger, stage=settings.stage, max_grad_norm=policy.max_grad_norm,
                 batch_size=mechanism.sample_rate * patients, generator=generator)
    trainer.fit(poisson_batches(train, sample_rate=mechanism.sample_rate, generator=generator), quiet=True)
    metrics = _metrics(n=0, loss=0.0, started=started, ledger=ledger, stage=settings.stage, exhausted=False)
    return RoundResult(group_arrays(stage), metrics), ledger


def curve(losses: Sequence[tuple[int, float]], *, points: int = CURVE_POINTS) -> dict[str, list[float]]:
    """A round's per-step ``(global step, loss)`` pairs as at most ``points`` window means (equal-sized windows).

    Returns ``{"train-loss-curve": [...], "train-loss-steps": [...]}``, the steps being each window's last step.
    """
    windows = [w for w in np.array_split(np.arange(len(losses)), min(points, len(losses))) if len(w)]
    return {"train-loss-curve": [float(np.mean([losses[i][1] for i in w])) for w in windows],
            "train-loss-steps": [float(losses[w[-1]][0]) for w in windows]}


def evaluate(settings: ClientSettings, arrays: Mapping[str, Tensor]) -> dict[str, float]:
    """Mean ``"model"`` loss of the global weights on the site's validation split (num-examples, eval-loss).

    A site without validation examples answers ``num-examples`` 0 and no ``eval-loss``: nothing to average. So
    does a DP site: its loss on real patients is not covered by its ledger, so it is not sent.
    """
    settings.refuse(f"evaluating {settings.stage}", training=False)
    if settings.policy.enabled:
        return {"num-examples": 0.0}
    task = load_task(settings.task)
    _, val = task.site_data(settings.stage, settings.site_dir, settings.config)
    n = len(val)  # type: ignore[arg-type]
    if n == 0:
        return {"num-examples": 0.0}
    stage = task.build_stage(settings.stage, settings.config)
    load_group_arrays(stage, arrays)
    return {"num-examples": float(n), "eval-loss": mean_loss(stage, val, batch_size=settings.batch_size,
                                                             seed=settings.seed)}


def mean_loss(stage: Stage, dataset: Dataset[Batch], *, batch_size: int, seed: int) -> float:
    """Example-weighted mean of the stage's ``"model"`` loss over ``dataset``, in eval mode, without gradients."""
    nets = stage.groups().values()
    for net in nets:
        net.eval()
    total, count = 0.0, 0
    n = len(dataset)  # type: ignore[arg-type]
    with torch.no_grad():
        for i, start in enumerate(range(0, n, batch_size)):
            set_step_seed(seed, i)  # before the items are drawn: random clip starts or pairs are seeded too
            batch = default_collate([dataset[j] for j in range(start, min(start + batch_size, n))])
            loss, _ = stage.loss("model", batch, step=0)
            size = len(next(iter(batch.values())))
            total, count = total + float(loss) * size, count + size
    for net in nets:
        net.train()
    return total / max(count, 1)


def _pull_toward(trainer: Trainer, anchor: Mapping[str, Tensor], *, strength: float) -> None:
    for group, optimizer in trainer.optimizers.items():
        pairs = [(p, anchor[f"{group}.{name}"]) for name, p in trainer.stage.groups()[group].named_parameters()]

        def pull(_opt: object, _args: object, _kwargs: object, pairs: Sequence[tuple[Tensor, Tensor]] = pairs) -> None:
            with torch.no_grad():
                for p, w in pairs:
                    p.sub_(p - w, alpha=strength)

        optimizer.register_step_post_hook(pull)


def _metrics(*, n: int, loss: float, started: float, ledger: PrivacyLedger | None, stage: str,
             exhausted: bool) -> dict[str, float | list[float]]:
    """The round's reply metrics; under DP only functions of the site's policy and its ledger (module docstring)."""
    if ledger is None:
        return {"num-examples": float(n), "train-loss": float(loss), "wall-s": time.perf_counter() - started,
                "epsilon": 0.0, "budget-exhausted": float(exhausted)}
    mechanism = ledger.stages[stage]
    return {
        "num-examples": 1.0,
        "epsilon": ledger.epsilon(),
        "epsilon-cap": mechanism.epsilon_cap,
        "dp-noise-multiplier": mechanism.noise_multiplier,
        "dp-sample-rate": mechanism.sample_rate,
        "dp-steps": float(ledger.steps),
        "dp-stage-steps": float(ledger.stage_steps.get(stage, 0)),
        "dp-delta": ledger.delta,
        "budget-exhausted": float(exhausted),
    }
