"""Per-site DP-SGD: per-stage calibration on one ledger, patient-level Poisson sampling, empty batches, budget
exhaustion, and the faster Opacus engine (per-sample gradients, the clipping bound, the noise) — no Flower."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn
from torch.utils.data import Dataset

from echoflow.clients.dp import (
    PrivacyLedger,
    StageMechanism,
    item_patients,
    make_private,
    patient_groups,
    poisson_batches,
)
from echoflow.clients.dp_engine import (
    FastDPOptimizer,
    FastGradSampleModule,
    grouped_conv_grad_sample,
    shifted_conv_grad_sample,
)
from echoflow.clients.policy import setup_of
from echoflow.clients.settings import ClientSettings
from echoflow.clients.site import train_round
from echoflow.config import load_config, plain
from echoflow.data.sites import FrameDataset
from echoflow.errors import EchoFlowError
from echoflow.federation.task import group_arrays
from echoflow.models.blocks import Attention
from echoflow.stages.objectives import build_stage
from echoflow.stages.trainer import TrainConfig, Trainer
from tests.federation.conftest import TASK, toy_run_config
from tests.federation.toy import TASK as TOY


def test_each_stage_is_calibrated_to_its_share_and_the_run_stays_within_the_target() -> None:
    ledger = PrivacyLedger(epsilon=4.0, delta=0.1 / 200)
    vae = ledger.begin_stage("vae", share=0.25, sample_rate=0.05, planned_steps=100)
    assert vae.epsilon_cap == pytest.approx(1.0)
    assert 0.99 < ledger.projected_epsilon("vae", 100) <= 1.0  # σ calibrated to the stage's share, to 0.1 %
    assert ledger.can_spend("vae", 100) and not ledger.can_spend("vae", 130)
    for _ in range(100):
        ledger.count_step("vae")
    flow = ledger.begin_stage("flow", share=0.75, sample_rate=0.1, planned_steps=50)
    assert flow.epsilon_cap == pytest.approx(4.0) and flow.noise_multiplier != vae.noise_multiplier
    assert 3.99 < ledger.projected_epsilon("flow", 50) <= 4.0  # composed with the VAE's history: total = target
    assert ledger.begin_stage("flow", share=0.75, sample_rate=0.5, planned_steps=5) == flow  # calibrated once
    with pytest.raises(EchoFlowError, match="no usable budget"):
        ledger.begin_stage("late", share=0.0, sample_rate=0.1, planned_steps=50)


def test_ledger_state_round_trips_and_keeps_counting() -> None:
    ledger = PrivacyLedger(epsilon=8.0, delta=1e-4)
    ledger.begin_stage("toy", share=1.0, sample_rate=0.1, planned_steps=20)
    for _ in range(7):
        ledger.count_step("toy")
    restored = PrivacyLedger.from_state(json.loads(json.dumps(ledger.state_dict())))
    assert restored.steps == 7 and restored.stage_steps == {"toy": 7}
    assert restored.epsilon() == pytest.approx(ledger.epsilon())
    restored.count_step("toy")
    assert restored.epsilon() > ledger.epsilon()
    with pytest.raises(EchoFlowError, match="per-stage"):
        PrivacyLedger.from_state({"epsilon_target": 8.0, "delta": 1e-4, "noise_multiplier": 1.0,
                                  "sample_rate": 0.1, "history": []})


def private_trainer(sigma: float, sample_rate: float, *, batch: float) -> tuple[Trainer, PrivacyLedger]:
    stage = TOY.build_stage("toy", {})
    trainer = Trainer(stage, TrainConfig(steps=1, batch_size=1, grad_clip=0.0, ema_decay=0.0, amp=False))
    ledger = PrivacyLedger(epsilon=8.0, delta=1e-3)
    ledger.stages["toy"] = StageMechanism(noise_multiplier=sigma, sample_rate=sample_rate, planned_steps=10,
                                          share=1.0, epsilon_cap=8.0)
    make_private(trainer, ledger, stage="toy", max_grad_norm=1.0, batch_size=batch,
                 generator=torch.Generator().manual_seed(0))
    return trainer, ledger


def test_empty_poisson_batch_still_takes_a_noisy_counted_step() -> None:
    train, _ = TOY.site_data("toy", Path("site_00"), {"n": 8})
    trainer, ledger = private_trainer(1.0, 1e-9, batch=1)
    draw = poisson_batches(train, sample_rate=1e-9, generator=torch.Generator().manual_seed(0))
    batch = draw()
    assert batch["x"].shape == (0, 4)
    before = group_arrays(trainer.stage)
    trainer.train_step(batch)
    after = group_arrays(trainer.stage)
    assert ledger.steps == 1
    assert all(not torch.equal(before[k], after[k]) for k in before)  # noise moved every group


def test_two_groups_share_one_accountant_with_scaled_noise() -> None:
    trainer, ledger = private_trainer(1.5, 0.1, batch=8)
    sigmas = {name: opt.noise_multiplier for name, opt in trainer.optimizers.items()}  # type: ignore[attr-defined]
    assert sigmas == {"model": pytest.approx(1.5 * 2**0.5), "disc": pytest.approx(1.5 * 2**0.5)}
    train, _ = TOY.site_data("toy", Path("site_00"), {"n": 64})
    trainer.fit(poisson_batches(train, sample_rate=0.1, generator=torch.Generator().manual_seed(0)), steps=3,
                quiet=True)
    assert ledger.steps == 3  # one joint mechanism per step, not one per group


class Visits(Dataset[dict[str, torch.Tensor]]):
    """Items of 5 patients with 1, 2, 3, 4 and 40 items (frames/visits) each."""

    def __init__(self) -> None:
        self.patient = torch.tensor([0] + [1] * 2 + [2] * 3 + [3] * 4 + [4] * 40)

    def __len__(self) -> int:
        return len(self.patient)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.full((2,), float(i)), "patient": self.patient[i]}


def test_poisson_sampling_draws_patients_and_one_item_each() -> None:
    """The unit is the patient: a patient with 40 frames is in a batch at most once, as often as one with 1."""
    data = Visits()
    draw = poisson_batches(data, sample_rate=0.5, generator=torch.Generator().manual_seed(1))
    counts = torch.zeros(5)
    seen_items = set()
    for _ in range(400):
        batch = draw()
        assert len(batch["patient"].unique()) == len(batch["patient"])  # one item per sampled patient
        counts += torch.bincount(batch["patient"], minlength=5)
        seen_items |= {int(x) for x in batch["x"][:, 0]}
    assert ((counts / 400 - 0.5).abs() < 0.1).all(), counts  # every patient at rate q, whatever its item count
    assert len(seen_items) > 40  # the item of a sampled patient is random


def test_a_frame_dataset_is_grouped_by_patient(tmp_path: Path) -> None:
    videos = [np.zeros((n, 8, 8), np.uint8) for n in (3, 2, 4)]
    table = type("T", (), {"patient": [7, 9, 7], "videos": videos})()
    frames = FrameDataset.__new__(FrameDataset)
    frames.table = table  # type: ignore[assignment]
    assert item_patients(frames).tolist() == [7] * 3 + [9] * 2 + [7] * 4
    assert [g.tolist() for g in patient_groups(frames)] == [[0, 1, 2, 5, 6, 7, 8], [3, 4]]


def test_site_stops_when_the_next_round_would_exceed_its_budget(tmp_path: Path) -> None:
    config = toy_run_config(tmp_path, **{"dp-enabled": True, "dp-epsilon": 2.0, "rounds": 2})
    policy = {"dp-enabled": True, "dp-epsilon": 2.0, "dp-plan": json.dumps({"toy": 1.0}),
              "dp-planned-steps": json.dumps({"toy": 10})}
    settings = ClientSettings.from_context(config, {"partition-id": 0} | setup_of(config) | policy)
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
    assert "train-loss" not in result.metrics and result.metrics["num-examples"] == 1.0  # nothing data-derived


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv1d(3, 4, 3, padding=1),
        nn.Conv2d(16, 24, 3, stride=2, padding=1),
        nn.Conv2d(32, 32, 3, padding=2, dilation=2, groups=2, bias=False),
        nn.Conv3d(16, 16, (1, 3, 3), padding=(0, 1, 1)),
        nn.Conv3d(4, 8, 3, stride=(2, 1, 1), padding=1),
    ],
)
def test_grouped_conv_grad_sample_equals_opacus(layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
    assert_sampler_equals_opacus(grouped_conv_grad_sample, layer)


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv3d(8, 16, (3, 1, 1), padding=(1, 0, 0)),  # the (2+1)D networks' temporal kernel
        nn.Conv3d(6, 4, (3, 1, 1), padding=(2, 0, 0), dilation=(2, 1, 1), bias=False),
        nn.Conv2d(16, 8, 1),
        nn.Conv2d(3, 5, (1, 3), padding=(0, 2)),  # padding wider than the kernel needs: a larger output
        nn.Conv1d(3, 4, 3, padding=1),
        nn.Conv2d(4, 6, 3, padding=1),  # 9 taps: the dispatcher sends it elsewhere, the sampler is still exact
    ],
)
def test_shifted_conv_grad_sample_equals_opacus(layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
    assert_sampler_equals_opacus(shifted_conv_grad_sample, layer)


def assert_sampler_equals_opacus(sampler: Callable[..., dict[torch.Tensor, torch.Tensor]],
                                 layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
    x = torch.randn(5, layer.in_channels, *[9] * (layer.weight.dim() - 2))
    backprops = torch.randn_like(layer(x))
    reference = compute_conv_grad_sample(layer, [x], backprops)
    fast = sampler(layer, x, backprops)
    assert fast.keys() == reference.keys()
    for p, grad in reference.items():
        assert fast[p].shape == (5, *p.shape)
        assert torch.allclose(fast[p], grad, atol=1e-5 * grad.abs().max().item(), rtol=1e-4)  # float32 sums


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(),
                                  nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(16 * 16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fast_module_gives_each_samples_own_gradient_and_restores_trainable_weights(reduction: str) -> None:
    torch.manual_seed(0)
    net, x = ConvNet(), torch.randn(4, 2, 8, 8)
    alone = [torch.autograd.grad(net(x[i:i + 1]).square().sum(), list(net.parameters())) for i in range(4)]
    FastGradSampleModule(net, loss_reduction=reduction)
    per_sample_loss = net(x).square().sum(dim=1)
    (per_sample_loss.sum() if reduction == "sum" else per_sample_loss.mean()).backward()
    assert all(p.requires_grad for p in net.parameters())
    # summed weight AND bias gradients skipped after the input (oneDNN computes the weight's with the bias's)
    assert net.body[3].weight.grad is None and net.body[3].bias.grad is None
    assert net.body[0].weight.grad is not None and net.body[0].bias.grad is not None  # the first layer keeps them
    for j, p in enumerate(net.parameters()):
        for i in range(4):
            assert torch.allclose(p.grad_sample[i], alone[i][j], atol=1e-5, rtol=1e-4)


def test_dp_step_clips_every_sample_to_the_bound_before_summing() -> None:
    torch.manual_seed(0)
    net, x, bound = ConvNet(), torch.randn(6, 2, 8, 8), 0.5
    x[0] *= 100  # one sample far above the bound, so an unclipped or batch-level clip would differ
    alone = [torch.autograd.grad(net(x[i:i + 1]).square().sum(), list(net.parameters())) for i in range(6)]
    norms = [torch.sqrt(sum(g.square().sum() for g in grads)) for grads in alone]
    assert min(norms) > bound  # every sample is clipped: the expected sum is exactly known
    expected = [sum(grads[j] * bound / (n + 1e-6) for grads, n in zip(alone, norms, strict=True))
                for j in range(len(alone[0]))]
    FastGradSampleModule(net, loss_reduction="sum")
    optimizer = FastDPOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), noise_multiplier=0.0,
                                max_grad_norm=bound, expected_batch_size=6, loss_reduction="sum")
    net(x).square().sum().backward()
    optimizer.step()
    for p, want in zip(net.parameters(), expected, strict=True):
        assert torch.allclose(p.grad, want, atol=1e-5, rtol=1e-4)
    assert torch.sqrt(sum(p.grad.square().sum() for p in net.parameters())) <= 6 * bound + 1e-4


class TwoViewNet(nn.Module):
    """Every layer kind the engine samples itself: conv, GroupNorm, token attention (3D linear), a 2D linear
    head, and a shared trunk run twice per sample (as the re-id encoder runs on both frames of a pair)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(2, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(),
                                   Attention(16, heads=2, video=False), nn.Conv2d(16, 8, 3, stride=2, padding=1))
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.trunk(x[:, :2]).flatten(1), self.trunk(x[:, 2:]).flatten(1)
        return self.head(a) * self.head(b)


@pytest.mark.parametrize("net_type", [ConvNet, TwoViewNet])
def test_dp_step_clips_each_samples_own_gradient_computed_alone(net_type: type[nn.Module]) -> None:
    torch.manual_seed(0)
    net, bound = net_type(), 0.05
    x = torch.randn(6, 2 if net_type is ConvNet else 4, 8, 8)
    x[0] *= 30  # one sample far above the bound
    alone = [torch.autograd.grad(net(x[i:i + 1]).square().sum(), list(net.parameters())) for i in range(6)]
    norms = [torch.sqrt(sum(g.square().sum() for g in grads)) for grads in alone]
    factors = [min(1.0, bound / (float(n) + 1e-6)) for n in norms]
    assert min(norms) > bound
    expected = [sum(grads[j] * f for grads, f in zip(alone, factors, strict=True)) for j in range(len(alone[0]))]
    FastGradSampleModule(net, loss_reduction="sum")
    optimizer = FastDPOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), noise_multiplier=0.0,
                                max_grad_norm=bound, expected_batch_size=6, loss_reduction="sum")
    net(x).square().sum(dim=1).sum().backward()
    for j, p in enumerate(net.parameters()):  # the engine's per-sample rows are each sample's own gradient
        for i in range(6):
            assert torch.allclose(p.grad_sample[i], alone[i][j], atol=1e-5 * float(norms[i]), rtol=1e-3)
    optimizer.step()
    for p, want in zip(net.parameters(), expected, strict=True):
        assert torch.allclose(p.grad, want, atol=1e-6, rtol=1e-3)
    assert torch.sqrt(sum(p.grad.square().sum() for p in net.parameters())) <= 6 * bound * (1 + 1e-4)


class MeanLossStage:
    """A one-group stage with a batch-MEAN loss over TwoViewNet, as the real stages have."""

    name = "toy"

    def __init__(self) -> None:
        self.net = TwoViewNet()

    def groups(self) -> dict[str, nn.Module]:
        return {"model": self.net}

    def loss(self, group: str, batch: dict[str, torch.Tensor], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return self.net(batch["x"]).square().sum(dim=1).mean(), {}


def test_make_private_releases_the_mean_of_each_items_own_gradient_clipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole DP path (mean loss, hooks, clipping, 1 / expected batch size) against each item's gradient
    computed alone, with the item's own loss (not its share of the batch mean); σ = 0 so the update is exact."""
    torch.manual_seed(0)
    stage, expected_batch = MeanLossStage(), 4.0
    x = torch.randn(6, 4, 8, 8)
    x[0] *= 30  # far above the bound; the others are clipped less or not at all
    net = stage.net
    alone = [torch.autograd.grad(net(x[i:i + 1]).square().sum(), list(net.parameters())) for i in range(6)]
    norms = [float(torch.sqrt(sum(g.square().sum() for g in grads))) for grads in alone]
    bound = sorted(norms)[2]  # some items clipped, some not
    factors = [min(1.0, bound / (n + 1e-6)) for n in norms]
    expected = torch.cat([sum(grads[j] * f for grads, f in zip(alone, factors, strict=True)).flatten()
                          for j in range(len(alone[0]))]) / expected_batch
    trainer = Trainer(stage, TrainConfig(steps=1, grad_clip=0.0, ema_decay=0.0, amp=False))
    ledger = PrivacyLedger(epsilon=8.0, delta=1e-3)
    ledger.stages["toy"] = StageMechanism(noise_multiplier=0.0, sample_rate=0.5, planned_steps=1, share=1.0,
                                          epsilon_cap=8.0)
    make_private(trainer, ledger, stage="toy", max_grad_norm=bound, batch_size=expected_batch,
                 generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: seen.append(
        torch.cat([p.grad.flatten() for group in self.param_groups for p in group["params"]])))
    trainer.train_step({"x": x})
    assert torch.allclose(seen[0], expected, atol=1e-4 * bound, rtol=1e-3)
    assert ledger.stage_steps["toy"] == 1


def test_fast_optimizer_noise_has_the_mechanisms_std_and_mean_scaling() -> None:
    torch.manual_seed(0)
    net = nn.Linear(300, 200)
    FastGradSampleModule(net, loss_reduction="mean")
    sigma, bound, batch = 1.7, 0.3, 4
    optimizer = FastDPOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), noise_multiplier=sigma,
                                max_grad_norm=bound, expected_batch_size=batch)
    (net(torch.zeros(2, 300)) * 0).sum().backward()  # zero per-sample gradients: p.grad is noise / batch
    optimizer.step()
    noise = torch.cat([p.grad.flatten() for p in net.parameters()]) * batch
    assert noise.mean().abs() < 0.01 * sigma * bound
    assert noise.std().item() == pytest.approx(sigma * bound, rel=0.01)


def stage_batch(name: str, n: int = 3) -> dict[str, torch.Tensor]:
    """A small batch of stage ``name`` at demo sizes (64x64 frames, 4x16x16 latents, 16-frame clips)."""
    ef = torch.rand(n) * 60 + 20
    return {
        "vae": {"frame": torch.rand(n, 1, 64, 64) * 2 - 1},
        "image_flow": {"frame": torch.randn(n, 4, 16, 16)},
        "reid": {"a": torch.randn(n, 4, 16, 16), "b": torch.randn(n, 4, 16, 16), "patient": torch.arange(n) % 2},
        "video_flow": {"clip": torch.randn(n, 4, 16, 16, 16), "ef": ef},
        "ef": {"clip": torch.rand(n, 1, 16, 64, 64) * 2 - 1, "ef": ef},
    }[name]


@pytest.mark.parametrize("name", ["vae", "image_flow", "reid", "video_flow", "ef"])
def test_fast_module_matches_opacus_on_every_demo_network(name: str) -> None:
    cfg = load_config()
    loss = plain(cfg.train[name].loss) | ({"adaptive": False, "adv_start": 0} if name == "vae" else {})
    stages = []
    for wrap in (GradSampleModule, FastGradSampleModule):
        torch.manual_seed(0)
        stage = build_stage(name, plain(cfg.model), loss)
        wrap(stage.groups()["model"], loss_reduction="mean")
        torch.manual_seed(1)
        stage.loss("model", stage_batch(name), step=0)[0].backward()
        stages.append(stage)
    reference, fast = (dict(s.groups()["model"].named_parameters()) for s in stages)
    for key, p in reference.items():
        scale = p.grad_sample.abs().max().item()
        assert torch.allclose(fast[key].grad_sample, p.grad_sample, atol=1e-5 * scale + 1e-7, rtol=1e-3), key


def privatised_gradient(stage_name: str, batch: dict[str, torch.Tensor], *, clip: float,
                        monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """The re-id update one noiseless DP step releases (σ=0, expected batch 1), trained as ``stage_name``."""
    cfg = load_config()
    torch.manual_seed(0)
    stage = build_stage("reid", plain(cfg.model), plain(cfg.train.reid.loss) | {"augment": False})
    trainer = Trainer(stage, TrainConfig(steps=1, grad_clip=0.0, ema_decay=0.0, amp=False))
    ledger = PrivacyLedger(epsilon=8.0, delta=1e-3)
    ledger.stages[stage_name] = StageMechanism(noise_multiplier=0.0, sample_rate=0.5, planned_steps=1, share=1.0,
                                               epsilon_cap=8.0)
    make_private(trainer, ledger, stage=stage_name, max_grad_norm=clip, batch_size=1,
                 generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: seen.append(
        torch.cat([p.grad.flatten() for group in self.param_groups for p in group["params"]])))
    trainer.train_step(batch)
    return seen[0]


def test_reid_under_dp_bounds_what_one_patient_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """InfoNCE couples patients (each is the others' negative), so per-item clipping proves no per-patient bound;
    the batch-clipped mechanism re-id trains with under DP moves the update by at most its accounted 2C."""
    torch.manual_seed(3)
    batch = stage_batch("reid", 8) | {"patient": torch.arange(8)}
    without = {k: torch.cat([v[:3], v[4:]]) for k, v in batch.items()}  # patient 3 left out
    clip = 1e-3
    coupled = [privatised_gradient("reid", b, clip=clip, monkeypatch=monkeypatch) for b in (batch, without)]
    assert coupled[0].norm() == pytest.approx(clip, rel=1e-3)  # the batch gradient, clipped as a whole
    assert (coupled[0] - coupled[1]).norm() <= 2 * clip * (1 + 1e-4)
    empty = {k: v[:0] for k, v in batch.items()}
    assert privatised_gradient("reid", empty, clip=clip, monkeypatch=monkeypatch).norm() == 0  # σ=0: nothing
