"""Faulty sites and bad updates, in-process (real ClientApp, strategies and round loop; no Ray): seconds each."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch

import echoflow.server.loop as loop
from echoflow.clients.policy import setup_of
from echoflow.clients.settings import ClientSettings
from echoflow.clients.site import train_round
from echoflow.errors import EchoFlowError
from echoflow.federation.task import group_arrays
from echoflow.server.checkpoint import FederationState, load_latest
from echoflow.server.roster import Roster, take_attendance
from echoflow.server.settings import ServerSettings
from tests.federation.conftest import crash_after_round, toy_run_config
from tests.federation.grid import LocalGrid
from tests.federation.toy import TASK


def federate(config: dict[str, Any], grid: LocalGrid) -> FederationState:
    """Set the sites up as the launcher of ``config`` (task, data, config: their own), then federate."""
    try:
        return loop.run_federation(grid.set_up(setup_of(config)), ServerSettings.from_run_config(config), config)
    finally:
        grid.close()


def with_plan(config: dict[str, Any], plan: dict[str, dict[str, str]]) -> dict[str, Any]:
    return config | {"fault-plan": json.dumps(plan)}


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()  # the ClientApp sets one thread per site
    yield
    torch.set_num_threads(threads)


def test_faulty_sites_are_left_out_named_and_logged(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plan = {"0": {"1": "crash"}, "1": {"2": "hang"}, "2": {"2": "nan", "3": "scale"}, "3": {"3": "shape"},
            "4": {"2": "drop"}}
    config = with_plan(toy_run_config(tmp_path, rounds=3, **{"timeout-s": 10.0, "min-sites": 1, "mlflow-uri": uri,
                                                             "mlflow-experiment": "faults"}), plan)

    state = federate(config, LocalGrid(6, parallel=True))

    assert state.round == 3
    missing = [{site: why.split(";")[0] for site, why in e["missing"].items()} for e in state.history]
    assert missing == [{"0": "train: error: site 0: injected crash in round 1"},
                       {"1": "train: no reply within 10 s", "4": "train: error: site 4: injected drop in round 2"},
                       {"4": "train: error: site 4: injected drop in round 3"}]
    assert state.history[1]["rejected"] == {"2": "model.0.weight holds NaN or Inf"}
    assert list(state.history[2]["rejected"]) == ["2", "3"]
    assert "x the round's median" in state.history[2]["rejected"]["2"]
    assert "has shape" in state.history[2]["rejected"]["3"]
    assert [e["trained"] for e in state.history] == [5, 3, 3]
    assert torch.isfinite(torch.cat([v.flatten().float() for v in state.arrays.values()])).all()
    # the round record is in the checkpoint JSON and, with the counts, in MLflow
    saved = load_latest(Path(config["checkpoint-dir"]))
    assert saved is not None and saved.history == json.loads(json.dumps(state.history))
    client = mlflow.MlflowClient(uri)
    assert [m.value for m in client.get_metric_history(state.mlflow_run_id, "sites_missing")] == [1.0, 2.0, 1.0]
    assert [m.value for m in client.get_metric_history(state.mlflow_run_id, "sites_rejected")] == [0.0, 1.0, 2.0]
    record = json.loads(Path(client.download_artifacts(state.mlflow_run_id, "faults/round_0003.json",
                                                       str(tmp_path))).read_text())
    assert record["round"] == 3 and set(record["missing"]) == {"4"} and set(record["rejected"]) == {"2", "3"}


def test_too_few_sites_fail_the_round_and_the_federation_resumes(tmp_path: Path) -> None:
    config = toy_run_config(tmp_path, rounds=3, **{"min-sites": 3})
    plan = {"1": {"2": "crash"}, "3": {"2": "nan"}}

    with pytest.raises(EchoFlowError, match=r"round 2: 2 of 4 sampled sites sent a usable update, "
                                             r"federation.min_sites is 3 \(site 1: train: error: site 1: injected "
                                             r"crash in round 2; site 3: rejected: .*NaN"):
        federate(with_plan(config, plan), LocalGrid(4))
    stopped = load_latest(Path(config["checkpoint-dir"]))
    assert stopped is not None and stopped.round == 1

    state = federate(config, LocalGrid(4))

    assert state.round == 3 and state.history[0] == stopped.history[0]
    assert [e["missing"] for e in state.history] == [{}, {}, {}]


def test_a_federation_whose_sites_dropped_out_fails_instead_of_waiting(tmp_path: Path) -> None:
    config = toy_run_config(tmp_path, **{"strategy-min-nodes": 3, "timeout-s": 1.0})
    with pytest.raises(EchoFlowError, match=r"round 1: 2 sites connected within 1 s, strategy.min_nodes needs 3"):
        federate(config, LocalGrid(2))
    # a site seen before that is no longer connected is missing, whether or not it was sampled
    roster = Roster({7: 0, 8: 1})
    attendance = take_attendance([], [], roster, connected=[7], phase="train", timeout_s=1.0)
    assert attendance.missing == {"1": "train: not connected"}


def test_a_resumed_federation_repeats_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replies arrive in another order after the restart; the global weights still match bit for bit."""
    config = toy_run_config(tmp_path / "a", rounds=3, strategy="fedadam")
    straight = federate(config, LocalGrid(5, order_seed=1))

    resumed_config = toy_run_config(tmp_path / "b", rounds=3, strategy="fedadam")
    undo = crash_after_round(monkeypatch, 2)
    with pytest.raises(RuntimeError):
        federate(resumed_config, LocalGrid(5, order_seed=2))
    undo()
    resumed = federate(resumed_config, LocalGrid(5, order_seed=3))

    assert resumed.round == straight.round == 3
    assert straight.arrays.keys() == resumed.arrays.keys()
    assert all(torch.equal(straight.arrays[k], resumed.arrays[k]) for k in straight.arrays)
    assert all(torch.equal(straight.strategy[k], resumed.strategy[k]) for k in straight.strategy)


@pytest.mark.parametrize(("strategy", "bounded"), [("fedmedian", True), ("krum", True), ("fedavg", False)])
def test_robust_strategies_bound_a_poisoning_site(tmp_path: Path, strategy: str, bounded: bool) -> None:
    """1 of 5 sites sends x100 updates every round, screening off: only the robust strategies hold."""
    rounds = 6
    settings = {"strategy": strategy, "rounds": rounds, "max-update-ratio": 0.0, "strategy-num-malicious": 1}
    clean = federate(toy_run_config(tmp_path / "clean", **settings), LocalGrid(5))
    plan = {"2": {str(r): "scale" for r in range(1, rounds + 1)}}
    attacked = federate(with_plan(toy_run_config(tmp_path / "attacked", **settings), plan), LocalGrid(5))

    assert [e["rejected"] for e in attacked.history] == [{}] * rounds  # the strategy saw every poisoned update
    clean_loss, attacked_loss = (s.history[-1]["aggregate"]["eval-loss"] for s in (clean, attacked))
    assert (abs(attacked_loss / clean_loss - 1) <= 0.10) is bounded, (clean_loss, attacked_loss)


def test_cyclic_rounds_are_the_sites_training_in_turn_and_pass_over_a_crashed_site(tmp_path: Path) -> None:
    config = toy_run_config(tmp_path, rounds=2, strategy="cyclic", evaluate=False)
    state = federate(with_plan(config, {"1": {"2": "crash"}}), LocalGrid(3))

    torch.manual_seed(0)  # the server's initial weights
    arrays = group_arrays(TASK.build_stage("toy", {"n": 64}))
    for server_round, sites in ((1, [0, 1, 2]), (2, [2, 0])):  # round 2 starts one site later; site 1 crashes
        for site in sites:
            settings = ClientSettings.from_context(config, {"partition-id": site} | setup_of(config))
            result, _ = train_round(settings, arrays, server_round=server_round, ledger=None)
            assert result.arrays is not None
            arrays = result.arrays
    assert all(torch.equal(state.arrays[k], arrays[k]) for k in arrays)
    assert [e["trained"] for e in state.history] == [3, 2] and list(state.history[1]["missing"]) == ["1"]
    with pytest.raises(EchoFlowError, match=r"secagg: strategy 'cyclic' needs the individual updates"):
        federate(toy_run_config(tmp_path / "secure", strategy="cyclic", secagg=True), LocalGrid(3))
