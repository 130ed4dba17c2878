"""Server pieces without a federation: strategy choice and state, settings, round checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum

from echoflow.errors import EchoFlowError
from echoflow.server.checkpoint import FederationState, load_latest, save_round
from echoflow.server.loop import check_same_federation
from echoflow.server.settings import ServerSettings, strategy_key
from echoflow.server.strategies import (
    NAMES,
    CyclicWeightTransfer,
    StrategyConfig,
    load_strategy_state,
    make_strategy,
    strategy_state,
)
from tests.federation.conftest import toy_run_config

KINDS = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi,
         "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum, "cyclic": CyclicWeightTransfer}


@pytest.mark.parametrize("name", NAMES)
def test_strategy_choice_is_honoured(tmp_path: Path, name: str) -> None:
    config = toy_run_config(tmp_path, strategy=name, **{strategy_key("proximal_mu"): 0.5,
                                                        strategy_key("min_nodes"): 3})
    settings = ServerSettings.from_run_config(config)
    strategy = make_strategy(settings.strategy)
    assert type(strategy) is KINDS[name]
    assert strategy.min_available_nodes == 3  # type: ignore[attr-defined]
    if name == "fedprox":
        assert strategy.proximal_mu == 0.5  # type: ignore[attr-defined]


def test_unknown_strategy_is_a_user_error() -> None:
    with pytest.raises(EchoFlowError, match=r"strategy\.name"):
        make_strategy(StrategyConfig(name="fedsgd"))


def test_adaptive_strategy_state_survives_a_restart() -> None:
    strategy = make_strategy(StrategyConfig(name="fedadam"))
    strategy.m_t = {"w": np.ones(3, dtype=np.float32)}  # type: ignore[attr-defined]
    strategy.v_t = {"w": np.full(3, 2.0, dtype=np.float32)}  # type: ignore[attr-defined]
    fresh = make_strategy(StrategyConfig(name="fedadam"))
    load_strategy_state(fresh, strategy_state(strategy))
    np.testing.assert_array_equal(fresh.v_t["w"], strategy.v_t["w"])  # type: ignore[attr-defined]
    assert strategy_state(make_strategy(StrategyConfig(name="fedavg"))) == {}


def test_server_momentum_survives_a_restart_in_weight_order() -> None:
    strategy = make_strategy(StrategyConfig(name="fedavgm", server_momentum=0.5))
    strategy.momentum_vector = [np.full(2, float(i), dtype=np.float32) for i in range(12)]  # type: ignore[attr-defined]
    fresh = make_strategy(StrategyConfig(name="fedavgm", server_momentum=0.5))
    load_strategy_state(fresh, strategy_state(strategy))
    restored = fresh.momentum_vector  # type: ignore[attr-defined]
    assert [float(v[0]) for v in restored] == [float(i) for i in range(12)]  # order kept past 10 entries
    with pytest.raises(EchoFlowError, match="momentum_vector"):
        load_strategy_state(make_strategy(StrategyConfig(name="fedadam")), strategy_state(strategy))


def test_round_checkpoints_keep_the_latest_two(tmp_path: Path) -> None:
    for server_round in (1, 2, 3):
        state = FederationState(round=server_round, arrays={"model.w": torch.full((2,), float(server_round))},
                                sites={"0": {"epsilon": 0.5 * server_round}}, history=[{"round": server_round}])
        save_round(tmp_path, state)
    latest = load_latest(tmp_path)
    assert latest is not None and latest.round == 3 and latest.sites["0"]["epsilon"] == 1.5
    assert torch.equal(latest.arrays["model.w"], torch.full((2,), 3.0))
    assert sorted(p.name for p in tmp_path.glob("round_*")) == ["round_0002", "round_0003"]
    assert load_latest(tmp_path / "nothing") is None


def test_a_checkpoint_of_another_federation_is_not_resumed(tmp_path: Path) -> None:
    saved = toy_run_config(tmp_path, **{"dp-enabled": True, "dp-epsilon": 8.0})
    check_same_federation(saved, saved | {"rounds": 5, "mlflow-parent-run-id": "abc"}, where="ckpt")
    with pytest.raises(EchoFlowError, match="dp-epsilon"):
        check_same_federation(saved, saved | {"dp-epsilon": 2.0}, where="ckpt")
