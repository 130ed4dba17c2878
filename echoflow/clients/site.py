"""One site's work in a round, free of Flower: train the stage from the global weights, or evaluate them.

Training uses the shared `Trainer` (AdamW, no EMA: the federation averages live weights). Each site and each
round get their own step seeds (site-mixed seed, steps numbered across rounds), so rounds never replay the
same batches and a resumed run replays exactly.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import nan

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from echoflow.clients.dp import PrivacyLedger, make_private, poisson_batches
from echoflow.clients.settings import ClientSettings
from echoflow.errors import EchoFlowError
from echoflow.federation.task import group_arrays, load_group_arrays, load_task
from echoflow.models.vae import AdversarialVAE
from echoflow.stages.trainer import Batch, Stage, TrainConfig, Trainer, random_batches, set_step_seed

CURVE_POINTS = 10
"""Most points of a round's training curve that a site reports (window means of its local steps)."""


@dataclass(frozen=True)
class RoundResult:
    """A site's reply to a training round.

    Attributes:
        arrays: updated weights (``"<group>.<param>"``), or None when the site's privacy budget is spent.
        metrics: num-examples, train-loss, wall-s (seconds), epsilon (cumulative; 0 without DP), the DP
            parameters (dp-noise-multiplier, dp-sample-rate, dp-steps, dp-delta) and budget-exhausted (0/1);
            without DP also the round's training curve: train-loss-curve (mean loss of up to `CURVE_POINTS`
            consecutive windows of local steps) and train-loss-steps (the global step ending each window).
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
    task = load_task(settings.task)
    stage = task.build_stage(settings.stage, settings.config)
    load_group_arrays(stage, arrays)
    train, _ = task.site_data(settings.stage, settings.site_dir, settings.config)
    n = len(train)  # type: ignore[arg-type]
    if settings.dp is not None and ledger is None:
        ledger = PrivacyLedger.calibrate(settings.dp, n_examples=n, batch_size=settings.batch_size,
                                         planned_steps=settings.rounds * settings.local_steps)
    if ledger is not None and not ledger.can_spend(settings.local_steps):
        return RoundResult(None, {**_metrics(n=0, loss=0.0, started=started, ledger=ledger, exhausted=True)}), ledger

    config = TrainConfig(
        steps=server_round * settings.local_steps, batch_size=settings.batch_size, lr=settings.lr,
        grad_clip=0.0 if ledger is not None else 1.0, ema_decay=0.0, log_every=1,
        seed=settings.seed * 1009 + settings.site, amp=False,
    )
    trainer = Trainer(stage, config)
    trainer.step = (server_round - 1) * settings.local_steps
    if proximal_mu > 0:
        _pull_toward(trainer, arrays, strength=settings.lr * proximal_mu)
    if ledger is not None and settings.dp is not None:
        make_private(trainer, ledger, max_grad_norm=settings.dp.max_grad_norm, batch_size=settings.batch_size)
        draw = poisson_batches(train, sample_rate=ledger.sample_rate)
    else:
        draw = random_batches(train, batch_size=settings.batch_size)
    losses: list[tuple[int, float]] = []
    trainer.fit(draw, quiet=True, on_metrics=lambda step, values: losses.append((step, values.get("model", nan))))
    loss = float(np.mean([value for _, value in losses])) if losses else nan  # the round's mean, as before
    metrics = _metrics(n=n, loss=loss, started=started, ledger=ledger, exhausted=False)
    return RoundResult(group_arrays(stage), metrics | ({} if ledger is not None else curve(losses))), ledger


def curve(losses: Sequence[tuple[int, float]], *, points: int = CURVE_POINTS) -> dict[str, list[float]]:
    """A round's per-step ``(global step, loss)`` pairs as at most ``points`` window means (equal-sized windows).

    Returns ``{"train-loss-curve": [...], "train-loss-steps": [...]}``, the steps being each window's last step.
    """
    windows = [w for w in np.array_split(np.arange(len(losses)), min(points, len(losses))) if len(w)]
    return {"train-loss-curve": [float(np.mean([losses[i][1] for i in w])) for w in windows],
            "train-loss-steps": [float(losses[w[-1]][0]) for w in windows]}


def evaluate(settings: ClientSettings, arrays: Mapping[str, Tensor]) -> dict[str, float]:
    """Mean ``"model"`` loss of the global weights on the site's validation split (num-examples, eval-loss).

    A site without validation examples answers ``num-examples`` 0 and no ``eval-loss``: nothing to average.
    """
    task = load_task(settings.task)
    _, val = task.site_data(settings.stage, settings.site_dir, settings.config)
    n = len(val)  # type: ignore[arg-type]
    if n == 0:
        return {"num-examples": 0.0}
    stage = task.build_stage(settings.stage, settings.config)
    load_group_arrays(stage, arrays)
    return {"num-examples": float(n), "eval-loss": mean_loss(stage, val, batch_size=settings.batch_size,
                                                             seed=settings.seed)}


def latent_moments(settings: ClientSettings, arrays: Mapping[str, Tensor]) -> dict[str, float]:
    """Moments of the global VAE's latent means over the site's TRAIN frames, for the shared ``latent_scale``.

    Only three aggregate scalars leave the site (they are not covered by the DP-SGD ledger).

    Returns:
        ``count`` (latent elements), ``mean`` and ``var`` (population variance) of the latent means.
    """
    task = load_task(settings.task)
    stage = task.build_stage(settings.stage, settings.config)
    load_group_arrays(stage, arrays)
    vae = stage.groups()["model"]
    if not isinstance(vae, AdversarialVAE):
        raise EchoFlowError(f"stage {settings.stage}: latent statistics need an AdversarialVAE as group 'model'")
    train, _ = task.site_data(settings.stage, settings.site_dir, settings.config)
    vae.eval()
    total, total_sq, count = 0.0, 0.0, 0
    with torch.no_grad():
        for batch in DataLoader(train, batch_size=64):
            z = vae.encode(batch["frame"]).mode().double()
            total, total_sq, count = total + z.sum().item(), total_sq + z.square().sum().item(), count + z.numel()
    mean = total / max(count, 1)
    return {"count": float(count), "mean": mean, "var": max(total_sq / max(count, 1) - mean**2, 0.0)}


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


def _metrics(*, n: int, loss: float, started: float, ledger: PrivacyLedger | None, exhausted: bool) -> dict[str, float]:
    return {
        "num-examples": float(n),
        "train-loss": float(loss),
        "wall-s": time.perf_counter() - started,
        "epsilon": ledger.epsilon() if ledger else 0.0,
        "dp-noise-multiplier": ledger.noise_multiplier if ledger else 0.0,
        "dp-sample-rate": ledger.sample_rate if ledger else 0.0,
        "dp-steps": float(ledger.steps) if ledger else 0.0,
        "dp-delta": ledger.delta if ledger else 0.0,
        "budget-exhausted": float(exhausted),
    }
