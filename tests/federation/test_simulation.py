"""End-to-end federations of the toy stage on Flower's Ray simulation engine (2 sites, 2-3 short rounds)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

import echoflow.server.loop as loop
from echoflow.clients.dp import PrivacyLedger, StageMechanism
from echoflow.clients.faults import fault_at, random_fault_plan
from echoflow.federation.simulation import SimulationConfig, simulate
from echoflow.federation.task import group_arrays
from echoflow.server.checkpoint import FederationState
from tests.federation.conftest import crash_after_round
from tests.federation.toy import TASK

SIM = SimulationConfig(sites=2, client_cpus=1.0, num_cpus=1)
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus' RDP orders, restated


def toy_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return group_arrays(TASK.build_stage("toy", {}))


def flat(arrays: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([arrays[k].flatten() for k in sorted(arrays)])


def site_history(state: FederationState, site: int, key: str) -> list[float]:
    return [entry["sites"][str(site)][key] for entry in state.history]


def test_dp_federation_accounts_epsilon_and_a_spent_site_stops(tmp_path: Path, run_config: dict[str, Any]) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = run_config | {"dp-enabled": True, "dp-epsilon": 3.0, "dp-max-grad-norm": 1.0, "mlflow-uri": uri,
                           "mlflow-experiment": "test", "rounds": 3, "strategy": "fedmedian"}
    # the sites' own policy (their node config): ε=3 for the toy stage, 3 rounds x 5 steps planned
    state_root = tmp_path / "site_state"
    policy = {"state-dir": str(state_root), "dp-enabled": True, "dp-epsilon": 3.0, "dp-max-grad-norm": 1.0,
              "dp-plan": json.dumps({"toy": 1.0}), "dp-planned-steps": json.dumps({"toy": 15})}
    # site 1 took part in an earlier study: its site-local ledger already holds most of its budget
    spent = PrivacyLedger(epsilon=3.0, delta=0.1 / 64)
    spent.stages["toy"] = StageMechanism(noise_multiplier=1.0, sample_rate=8 / 64, planned_steps=15, share=1.0,
                                         epsilon_cap=3.0)
    spent.stage_steps["toy"] = 10
    spent.accountant.history = [(1.0, 8 / 64, 10)]
    assert spent.can_spend("toy", 5) and not spent.can_spend("toy", 2 * 5)  # room for exactly one more round
    (state_root / "site_01").mkdir(parents=True)
    (state_root / "site_01" / "privacy_ledger.json").write_text(json.dumps(spent.state_dict()))
    initial = toy_weights()

    state = simulate(config, SIM, site_config=policy)

    assert state.round == 3 and [e["round"] for e in state.history] == [1, 2, 3]
    assert not torch.equal(flat(state.arrays), flat(initial))
    # site 0: cumulative ε grows every round, ends within (and close to) its target, and is reproducible
    eps = site_history(state, 0, "epsilon")
    assert all(b > a for a, b in itertools.pairwise(eps)), eps
    assert 3.0 * 0.9 < eps[-1] <= 3.0
    last = state.history[-1]["sites"]["0"]
    assert site_history(state, 0, "dp-steps") == [5.0, 10.0, 15.0]
    rdp = compute_rdp(q=last["dp-sample-rate"], noise_multiplier=last["dp-noise-multiplier"],
                      steps=int(last["dp-steps"]), orders=ORDERS)
    recomputed, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=last["dp-delta"])
    assert recomputed == pytest.approx(eps[-1], rel=1e-9)
    # site 1: stops once its budget cannot fit another round, never exceeds it; the federation goes on
    assert site_history(state, 1, "budget-exhausted") == [0.0, 1.0, 1.0]
    assert site_history(state, 1, "dp-steps") == [15.0, 15.0, 15.0]
    assert site_history(state, 1, "epsilon")[-1] <= 3.0
    assert site_history(state, 0, "budget-exhausted") == [0.0, 0.0, 0.0]
    assert [e["trained"] for e in state.history][-1] == 1
    # MLflow: one run with the config as params, per-site metrics per round
    client = mlflow.MlflowClient(uri)
    run = client.get_run(state.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["dp-epsilon"] == "3.0"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "site_00/epsilon")] == [1, 2, 3]


def test_crashed_server_resumes_from_last_round(
    tmp_path: Path, run_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = run_config | {"strategy": "fedadam"}
    undo = crash_after_round(monkeypatch, 1)
    with pytest.raises(RuntimeError):
        simulate(config, SIM)
    undo()
    first = loop.load_latest(Path(config["checkpoint-dir"]))
    assert first is not None and first.round == 1 and any(k.startswith("m_t/") for k in first.strategy)

    state = simulate(config, SIM)

    assert state.round == 2 and [e["round"] for e in state.history] == [1, 2]
    assert not torch.equal(flat(state.arrays), flat(first.arrays))


def test_a_third_of_the_sites_failing_at_random_rounds_does_not_stop_the_federation(
    tmp_path: Path, run_config: dict[str, Any]
) -> None:
    """2 of 6 sites crash, drop out or send NaN weights in seeded random rounds; every round completes."""
    rounds = 4
    plan = random_fault_plan(sites=6, rounds=rounds, faulty=2, rate=0.5, kinds=("crash", "drop", "nan"), seed=4)
    config = run_config | {"rounds": rounds, "min-sites": 3, "fault-plan": json.dumps(plan)}

    state = simulate(config, SimulationConfig(sites=6, client_cpus=1.0, num_cpus=1))

    assert state.round == rounds and [e["round"] for e in state.history] == list(range(1, rounds + 1))
    faults = 0
    for entry in state.history:
        planned = {site: fault_at(plan, int(site), entry["round"]) for site in plan}
        crashed = {site for site, kind in planned.items() if kind in ("crash", "drop")}
        assert set(entry["missing"]) == crashed, entry["missing"]
        for site, why in entry["missing"].items():
            assert f"site {site}: injected {planned[site]} in round {entry['round']}" in why
        nan = "model.0.weight holds NaN or Inf"
        assert entry["rejected"] == {site: nan for site, kind in planned.items() if kind == "nan"}
        assert entry["trained"] == 6 - len(crashed) - len(entry["rejected"])
        assert entry["aggregate"]["sites-missing"] == len(crashed)
        faults += len(crashed) + len(entry["rejected"])
    assert faults >= rounds  # the seeded plan hits every round
    assert torch.isfinite(flat(state.arrays)).all()
