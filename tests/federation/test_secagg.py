"""Secure aggregation (SecAgg+): the server receives only masked vectors, and unmasks exactly the sites' mean."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.common import bytes_to_ndarray
from flwr.server.workflow.secure_aggregation import secaggplus_workflow

from echoflow.clients.policy import setup_of
from echoflow.clients.settings import ClientSettings
from echoflow.clients.site import train_round
from echoflow.errors import EchoFlowError
from echoflow.federation.simulation import SimulationConfig, simulate
from echoflow.federation.task import group_arrays
from echoflow.server.roster import Roster
from echoflow.server.secagg import SecAggConfig, gather_secure_training
from echoflow.server.settings import ServerSettings
from echoflow.server.strategies import StrategyConfig, make_strategy
from tests.federation.toy import TASK

SITES = 3


def site_updates(config: dict[str, Any], initial: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Each site's round-1 update, recomputed here exactly as the site computes it (same seeds)."""
    updates = []
    for site in range(SITES):
        settings = ClientSettings.from_context(config, {"partition-id": site} | setup_of(config))
        result, _ = train_round(settings, initial, server_round=1, ledger=None)
        assert result.arrays is not None
        updates.append(np.concatenate([(result.arrays[k].double() - initial[k].double()).numpy().ravel()
                                       for k in initial]))
    return updates


def test_server_sees_only_masked_vectors_and_unmasks_the_mean_update(
    tmp_path: Path, run_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = run_config | {"rounds": 1, "evaluate": False, "secagg": True, "strategy-min-nodes": SITES}
    received: list[np.ndarray] = []

    def spy(data: bytes) -> np.ndarray:  # the server decoding the sites' masked vectors
        array = bytes_to_ndarray(data)
        received.append(array)
        return array

    monkeypatch.setattr(secaggplus_workflow, "bytes_to_ndarray", spy)
    torch.manual_seed(0)
    initial = group_arrays(TASK.build_stage("toy", {}))

    state = simulate(config, SimulationConfig(sites=SITES, client_cpus=1.0, num_cpus=1))

    assert sorted(state.history[0]["sites"]) == ["0", "1", "2"] and state.history[0]["trained"] == 1
    updates = site_updates(config, initial)
    mean = np.mean(updates, axis=0)
    got = np.concatenate([(state.arrays[k].double() - initial[k].double()).numpy().ravel() for k in initial])
    step = 2 * SecAggConfig().clipping_range / SecAggConfig().quantization_range
    assert np.abs(mean).max() > 1e4 * step  # real updates, far coarser than the quantisation step
    np.testing.assert_allclose(got, mean, atol=4 * step + 1e-6)  # + float32 rounding of the new weights
    # each masked vector: [weight] + one array per weight tensor; none reads as any site's quantised update
    per_site = len(initial) + 1
    assert len(received) == SITES * per_site
    quantizer = SecAggConfig().quantization_range / (2 * SecAggConfig().clipping_range)
    for i in range(SITES):
        masked = np.concatenate([a.ravel() for a in received[i * per_site + 1:(i + 1) * per_site]])
        as_update = masked / quantizer - SecAggConfig().clipping_range
        for update in updates:
            assert np.mean(np.abs(as_update - update) < 1e-3) < 0.01


def test_strategies_that_need_individual_updates_are_refused(tmp_path: Path, run_config: dict[str, Any]) -> None:
    settings = ServerSettings.from_run_config(run_config | {"secagg": True, "strategy": "krum"})
    with pytest.raises(EchoFlowError, match="krum"):
        gather_secure_training(None, make_strategy(StrategyConfig(name="krum")), {}, None, Roster(),  # type: ignore[arg-type]
                               server_round=1, settings=settings)
