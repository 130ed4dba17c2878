"""Per-site DP-SGD: calibration, the cumulative ledger, empty Poisson batches, budget exhaustion (no Flower)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from echoflow.clients.dp import DPConfig, PrivacyLedger, make_private, poisson_batches
from echoflow.clients.settings import ClientSettings
from echoflow.clients.site import train_round
from echoflow.clients.task import group_arrays
from echoflow.training import TrainConfig, Trainer
from tests.federation.conftest import TASK, toy_run_config
from tests.federation.toy import TASK as TOY


def test_calibration_spends_the_target_exactly_at_the_planned_steps() -> None:
    ledger = PrivacyLedger.calibrate(DPConfig(epsilon=4.0), n_examples=200, batch_size=10, planned_steps=100)
    assert ledger.delta == pytest.approx(0.1 / 200) and ledger.sample_rate == pytest.approx(0.05)
    assert 3.9 < ledger.projected_epsilon(100) <= 4.0
    assert ledger.can_spend(100) and not ledger.can_spend(130)


def test_ledger_state_round_trips_and_keeps_counting() -> None:
    ledger = PrivacyLedger(epsilon=8.0, delta=1e-4, noise_multiplier=1.1, sample_rate=0.1)
    for _ in range(7):
        ledger.count_step()
    restored = PrivacyLedger.from_state(ledger.state_dict())
    assert restored.steps == 7 and restored.epsilon() == pytest.approx(ledger.epsilon())
    restored.count_step()
    assert restored.epsilon() > ledger.epsilon()


def test_empty_poisson_batch_still_takes_a_noisy_counted_step() -> None:
    train, _ = TOY.site_data("toy", Path("site_00"), {"n": 8})
    stage = TOY.build_stage("toy", {})
    trainer = Trainer(stage, TrainConfig(steps=1, batch_size=1, grad_clip=0.0, ema_decay=0.0, amp=False))
    ledger = PrivacyLedger(epsilon=8.0, delta=1e-3, noise_multiplier=1.0, sample_rate=1e-9)
    make_private(trainer, ledger, max_grad_norm=1.0, batch_size=1)
    draw = poisson_batches(train, sample_rate=ledger.sample_rate)
    batch = draw()
    assert batch["x"].shape == (0, 4)
    before = group_arrays(stage)
    trainer.train_step(batch)
    after = group_arrays(stage)
    assert ledger.steps == 1
    assert all(not torch.equal(before[k], after[k]) for k in before)  # noise moved every group


def test_two_groups_share_one_accountant_with_scaled_noise() -> None:
    stage = TOY.build_stage("toy", {})
    trainer = Trainer(stage, TrainConfig(steps=1, grad_clip=0.0, ema_decay=0.0, amp=False))
    ledger = PrivacyLedger(epsilon=8.0, delta=1e-3, noise_multiplier=1.5, sample_rate=0.1)
    make_private(trainer, ledger, max_grad_norm=1.0, batch_size=8)
    sigmas = {name: opt.noise_multiplier for name, opt in trainer.optimizers.items()}  # type: ignore[attr-defined]
    assert sigmas == {"model": pytest.approx(1.5 * 2**0.5), "disc": pytest.approx(1.5 * 2**0.5)}
    train, _ = TOY.site_data("toy", Path("site_00"), {"n": 64})
    trainer.fit(poisson_batches(train, sample_rate=0.1), steps=3, quiet=True)
    assert ledger.steps == 3  # one joint mechanism per step, not one per group


def test_site_stops_when_the_next_round_would_exceed_its_budget(tmp_path: Path) -> None:
    config = toy_run_config(tmp_path, **{"dp-enabled": True, "dp-epsilon": 2.0, "rounds": 2})
    settings = ClientSettings.from_context(config, {"partition-id": 0})
    assert settings.task == TASK
    arrays = group_arrays(TOY.build_stage("toy", {}))
    ledger = None
    epsilons = []
    for server_round in (1, 2, 3):
        result, ledger = train_round(settings, arrays, server_round=server_round, ledger=ledger)
        epsilons.append(result.metrics["epsilon"])
        arrays = result.arrays or arrays
    assert result.arrays is None and result.metrics["budget-exhausted"] == 1.0
    assert epsilons[0] < epsilons[1] == epsilons[2] <= 2.0
