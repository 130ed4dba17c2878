from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from echoflow.server.checkpoint import FederationState

TASK = "tests.federation.toy:TASK"


def toy_run_config(tmp: Path, **overrides: Any) -> dict[str, Any]:
    """A run config for the toy task: 2 rounds x 5 local steps, FedAvg, no DP, no MLflow."""
    config = {
        "task": TASK, "stage": "toy", "config-json": json.dumps({"n": 64}), "rounds": 2, "local-steps": 5,
        "batch-size": 8, "lr": 0.01, "seed": 0, "data-root": str(tmp / "cohort"),
        "checkpoint-dir": str(tmp / "ckpt"), "state-root": str(tmp / "site_state"), "strategy": "fedavg",
        "strategy-min-nodes": 2, "resume": True, "evaluate": True, "dp-enabled": False,
    }
    return config | overrides


@pytest.fixture()
def run_config(tmp_path: Path) -> dict[str, Any]:
    return toy_run_config(tmp_path)


def crash_after_round(monkeypatch: pytest.MonkeyPatch, crash_round: int) -> Callable[[], None]:
    """Make the server loop raise right after checkpointing ``crash_round``; returns the undo."""
    from echoflow.server import loop

    save = loop.save_round

    def save_then_crash(directory: Path, state: FederationState) -> Path:
        folder = save(directory, state)
        if state.round == crash_round:
            raise RuntimeError(f"server killed after round {crash_round}")
        return folder

    monkeypatch.setattr(loop, "save_round", save_then_crash)
    return lambda: monkeypatch.setattr(loop, "save_round", save)
