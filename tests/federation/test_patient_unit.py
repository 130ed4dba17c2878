"""The patient is the unit of privacy: a patient with many videos still moves a DP step by at most C.

A site where patient 0 holds 48 identical items (frames of many videos of one heart) and 16 other patients one
item each. Identical items have identical per-sample gradients, so k of them in one step add up to exactly k·C
after clipping: item-level sampling lets patient 0 move a step by several C (the frame would be the unit, and
ε would be per frame). Patient-level sampling (one item per sampled patient, `poisson_batches`) bounds every
step's clipped sum by C per sampled patient. Runs a real DP round of the site (`train_round`): about a second.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import Dataset

from echoflow.clients.dp_engine import FastDPOptimizer
from echoflow.clients.settings import ClientSettings
from echoflow.clients.site import train_round
from echoflow.federation.task import group_arrays
from tests.federation.toy import DIM, ToyStage

C = 1e-3  # far below every per-sample gradient norm: each item's gradient is clipped to exactly C
MANY, SINGLES = 48, 16
STEPS = 12


class PatientItems(Dataset[dict[str, Tensor]]):
    """Patient 0: ``MANY`` copies of one point; patients 1..``SINGLES``: one point each."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        points = torch.randn(SINGLES + 1, DIM, generator=g)
        self.x = torch.cat([points[:1].expand(MANY, DIM), points[1:]])
        self.patient = torch.cat([torch.zeros(MANY, dtype=torch.long), torch.arange(1, SINGLES + 1)])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "patient": self.patient[i]}


BATCHES: list[Tensor] = []
"""The patient ids of every batch the ``model`` group trained on (in step order)."""


class RecordingStage(ToyStage):
    def loss(self, group: str, batch: dict[str, Tensor], *, step: int) -> tuple[Tensor, dict[str, float]]:
        if group == "model":
            BATCHES.append(batch["patient"].clone())
        return super().loss(group, batch, step=step)


class PatientTask:
    def build_stage(self, name: str, config: Mapping[str, Any]) -> RecordingStage:
        torch.manual_seed(0)
        return RecordingStage(name)

    def site_data(self, name: str, site_dir: Path, config: Mapping[str, Any]) -> tuple[PatientItems, PatientItems]:
        return PatientItems(), PatientItems()


TASK = PatientTask()
TASK_PATH = "tests.federation.test_patient_unit:TASK"


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_patient_with_many_items_moves_a_dp_step_by_at_most_c(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sums: list[float] = []  # norm of the model group's clipped per-sample sum, before noise, per step
    add_noise = FastDPOptimizer.add_noise

    def recording(self: FastDPOptimizer) -> None:
        if len(self.params) == 4:  # the model group (2 linear layers); the discriminator has 2 tensors
            sums.append(float(torch.cat([p.summed_grad.flatten() for p in self.params]).norm()))
        add_noise(self)

    monkeypatch.setattr(FastDPOptimizer, "add_noise", recording)
    dp = {"dp-enabled": True, "dp-epsilon": 8.0, "dp-delta": 1e-3, "dp-max-grad-norm": C}
    run_config = {"task": TASK_PATH, "stage": "toy", "config-json": "{}", "rounds": 1, "local-steps": STEPS,
                  "batch-size": 8, "lr": 0.01, "seed": 0, "data-root": str(tmp_path / "cohort")} | dp
    node_config = {"partition-id": 0, "task": TASK_PATH, "data-root": str(tmp_path / "cohort"), "config-json": "{}",
                   "dp-plan": json.dumps({"toy": 1.0}), "dp-planned-steps": json.dumps({"toy": STEPS})} | dp
    settings = ClientSettings.from_context(run_config, node_config)
    BATCHES.clear()
    result, _ = train_round(settings, group_arrays(TASK.build_stage("toy", {})), server_round=1, ledger=None)
    assert result.arrays is not None and len(BATCHES) == len(sums) == STEPS
    assert sum(bool((batch == 0).any()) for batch in BATCHES) >= 2  # patient 0 is sampled, like any patient
    for batch, norm in zip(BATCHES, sums, strict=True):
        items = Counter(batch.tolist())
        assert max(items.values(), default=0) <= 1, f"a patient contributed {max(items.values())} items to one step"
        assert norm <= C * len(items) * (1 + 1e-4), (norm, len(items))  # ≤ C per sampled patient
