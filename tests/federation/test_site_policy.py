"""Attacks by an honest-but-curious server that writes every message: each must fail against the site.

- noise prediction: the server replays a site's round (same run config) and gets the site's DP noise;
- DP switched off (or weakened) by a message;
- a DP pipeline silently skipping stages: one budget per site must cover several stages, and a stage no site
  can train stops the run instead of keeping its random initial weights;
- another code path or other data by message: the task a site runs, its data folder and its training config are
  its own (node config), so a message naming others is refused, and a site with no data folder of its own
  never takes one from a message.

In-process (real ClientApp, strategies and round loop through `LocalGrid`; no Ray): seconds each.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import echoflow.server.loop as loop
from echoflow.cli import app
from echoflow.clients.dp_engine import FastDPOptimizer
from echoflow.clients.settings import ClientSettings
from echoflow.clients.site import train_round
from echoflow.errors import EchoFlowError
from echoflow.federation.protocol import REFUSAL
from echoflow.federation.task import group_arrays
from echoflow.server.checkpoint import FederationState
from echoflow.server.roster import _short
from echoflow.server.settings import ServerSettings
from tests.federation import toy
from tests.federation.conftest import TASK as TASK_PATH
from tests.federation.conftest import toy_run_config
from tests.federation.grid import LocalGrid
from tests.federation.toy import TASK

EPSILON = 4.0


def site_policy(**overrides: Any) -> dict[str, Any]:
    """A site's own DP policy (its node config): ε=4 over two toy stages of 2 rounds x 5 steps each."""
    return {"dp-enabled": True, "dp-epsilon": EPSILON, "dp-delta": 0.0, "dp-max-grad-norm": 1.0,
            "dp-plan": json.dumps({"toy": 0.5, "toy2": 0.5}),
            "dp-planned-steps": json.dumps({"toy": 10, "toy2": 10})} | overrides


def dp_run_config(tmp: Path, **overrides: Any) -> dict[str, Any]:
    """The server's run config asking for the same DP the sites' policies hold."""
    return toy_run_config(tmp, **{"dp-enabled": True, "dp-epsilon": EPSILON, "dp-delta": 0.0,
                                  "dp-max-grad-norm": 1.0} | overrides)


def own_setup(tmp: Path) -> dict[str, Any]:
    """A site's own code path, data and training config (its node config; in simulation baked into its app)."""
    return {"task": TASK_PATH, "data-root": str(tmp / "cohort"), "config-json": json.dumps({"n": 64})}


def federate(config: dict[str, Any], grid: LocalGrid) -> FederationState:
    return loop.run_federation(grid, ServerSettings.from_run_config(config), config)


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()  # the ClientApp sets one thread per site
    yield
    torch.set_num_threads(threads)


def recorded_noise(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every DP step's noise vector (the noised gradient minus the clipped sum), in step order."""
    noises: list[torch.Tensor] = []
    add_noise = FastDPOptimizer.add_noise

    def recording(self: FastDPOptimizer) -> None:
        summed = [p.summed_grad.clone() for p in self.params]
        add_noise(self)
        noises.append(torch.cat([(p.grad - s).flatten() for p, s in zip(self.params, summed, strict=True)]))

    monkeypatch.setattr(FastDPOptimizer, "add_noise", recording)
    return noises


def one_round(tmp: Path, node_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    noises = recorded_noise(monkeypatch)
    settings = ClientSettings.from_context(dp_run_config(tmp), {"partition-id": 0} | own_setup(tmp) | node_config)
    result, _ = train_round(settings, group_arrays(TASK.build_stage("toy", {})), server_round=1, ledger=None)
    assert result.arrays is not None and noises
    return torch.cat(noises)


def test_the_server_cannot_reproduce_a_sites_noise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replaying site 0's round — on site 0's data or on other data — must not give site 0's noise."""
    site = one_round(tmp_path / "a", site_policy(), monkeypatch)
    replay = one_round(tmp_path / "b", site_policy(), monkeypatch)
    other_data = one_round(tmp_path / "c", site_policy() | {"site-dir": str(tmp_path / "site_01")}, monkeypatch)
    assert site.shape == replay.shape == other_data.shape
    for guess in (replay, other_data):
        # independent N(0, σ²C²) draws: the correlation of two noise vectors is ~N(0, 1/d), never ~1
        correlation = torch.corrcoef(torch.stack([site, guess]))[0, 1]
        assert abs(float(correlation)) < 0.5, float(correlation)


def test_a_reproducible_simulation_takes_its_secret_seed_from_the_sites_own_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = one_round(tmp_path / "a", site_policy(**{"dp-secret-seed": 123}), monkeypatch)
    again = one_round(tmp_path / "b", site_policy(**{"dp-secret-seed": 123}), monkeypatch)
    other = one_round(tmp_path / "c", site_policy(**{"dp-secret-seed": 124}), monkeypatch)
    assert torch.equal(first, again) and not torch.equal(first, other)
    with pytest.raises(EchoFlowError, match="dp-secret-seed"):
        ClientSettings.from_context(dp_run_config(tmp_path, **{"dp-secret-seed": 123}),
                                    {"partition-id": 0} | own_setup(tmp_path) | site_policy())


@pytest.mark.parametrize(("request_", "why"), [
    ({"dp-enabled": False}, "DP off"),
    ({"dp-epsilon": 2 * EPSILON}, "ε"),
    ({"dp-max-grad-norm": 5.0}, "clipping"),
    ({"dp-delta": 0.1}, "δ"),
    ({"rounds": 3}, "planned"),
    ({"stage": "unplanned"}, "plan"),
])
def test_a_message_weakening_the_sites_policy_is_refused(
    tmp_path: Path, request_: dict[str, Any], why: str,
) -> None:
    settings = ClientSettings.from_context(dp_run_config(tmp_path, **request_),
                                           {"partition-id": 0} | own_setup(tmp_path) | site_policy())
    arrays = group_arrays(TASK.build_stage("toy", {}))
    with pytest.raises(EchoFlowError, match=f"refuses.*{why}"):
        train_round(settings, arrays, server_round=1, ledger=None)


def test_dp_switched_off_by_message_gets_no_update_and_the_round_records_the_refusal(tmp_path: Path) -> None:
    config = dp_run_config(tmp_path, **{"dp-enabled": False, "min-sites": 1})
    grid = LocalGrid(2, node_config=site_policy() | own_setup(tmp_path))
    try:
        with pytest.raises(EchoFlowError, match=r"round 1: 0 of 2 .*site 0: .*refuses.*DP off") as caught:
            federate(config, grid)
    finally:
        grid.close()
    assert "\n" not in str(caught.value)
    assert loop.load_latest(Path(config["checkpoint-dir"])) is None  # nothing aggregated, nothing checkpointed


def test_two_dp_stages_share_one_budget_and_both_train(tmp_path: Path) -> None:
    grid = LocalGrid(2, node_config=site_policy() | own_setup(tmp_path))
    try:
        states = [federate(dp_run_config(tmp_path, stage=stage, **{"checkpoint-dir": str(tmp_path / stage)}), grid)
                  for stage in ("toy", "toy2")]
    finally:
        grid.close()
    initial = group_arrays(TASK.build_stage("toy", {}))
    for state in states:
        assert state.round == 2 and [e["trained"] for e in state.history] == [2, 2]
        assert any(not torch.equal(state.arrays[k], initial[k]) for k in initial)
    for site in (0, 1):  # (in memory the round record is keyed by site index)
        after_first = states[0].history[-1]["sites"][site]["epsilon"]
        after_both = states[1].history[-1]["sites"][site]["epsilon"]
        assert 0.8 * EPSILON / 2 < after_first <= EPSILON / 2 + 1e-9  # stage 1 spent its share of the plan
        assert after_first < after_both <= EPSILON  # one accountant: stage 2 adds to it, the total stays in budget
        assert after_both > 0.9 * EPSILON


def test_a_stage_whose_budget_is_spent_stops_the_run(tmp_path: Path) -> None:
    """Federating a stage a second time finds its share spent: the run stops instead of going on untrained."""
    grid = LocalGrid(2, node_config=site_policy() | own_setup(tmp_path))
    try:
        federate(dp_run_config(tmp_path, **{"checkpoint-dir": str(tmp_path / "first")}), grid)
        with pytest.raises(EchoFlowError, match="no site could train"):
            federate(dp_run_config(tmp_path, **{"checkpoint-dir": str(tmp_path / "again")}), grid)
    finally:
        grid.close()


@pytest.mark.parametrize(("request_", "why"), [
    ({"task": "tests.federation.toy:OTHER"}, "task"),
    ({"data-root": "/srv/another-hospital"}, "data-root"),
    ({"config-json": json.dumps({"n": 8})}, "config"),
])
def test_a_message_cannot_point_a_site_at_other_code_or_data(
    tmp_path: Path, request_: dict[str, Any], why: str,
) -> None:
    config = toy_run_config(tmp_path, **request_, **{"min-sites": 1})
    toy.READ.clear()
    grid = LocalGrid(2, node_config=own_setup(tmp_path))
    try:
        with pytest.raises(EchoFlowError, match=rf"round 1: 0 of 2 .*site 0: .*refuses.*{why}"):
            federate(config, grid)
    finally:
        grid.close()
    assert toy.READ == []  # no site ran the other code, nor opened any data for it


def test_a_site_without_a_data_folder_of_its_own_takes_none_from_a_message(tmp_path: Path) -> None:
    with pytest.raises(EchoFlowError, match=r"node_config: .*'site-dir'.*'data-root'"):
        ClientSettings.from_context(toy_run_config(tmp_path), {"partition-id": 0})


def test_the_round_records_a_refusal_apart_from_missing_sites(tmp_path: Path) -> None:
    """Site 1's policy is ε=2, the run asks ε=4: site 1 refuses, site 0 trains; the round says who refused."""
    config = dp_run_config(tmp_path, **{"min-sites": 1})
    grid = LocalGrid(2, node_config=site_policy() | own_setup(tmp_path),
                     site_configs={1: {"dp-epsilon": EPSILON / 2}})
    try:
        state = federate(config, grid)
    finally:
        grid.close()
    for entry in state.history:
        assert entry["trained"] == 1 and sorted(entry["sites"]) == [0]
        assert list(entry["refused"]) == ["1"] and "refuses" in entry["refused"]["1"]
        assert "ε=4" in entry["refused"]["1"] and "1" not in entry["missing"]
        assert entry["aggregate"]["sites-refused"] == 1.0 and entry["aggregate"]["sites-missing"] == 0.0


def test_the_server_keeps_its_per_stage_keys_of_the_config(tmp_path: Path) -> None:
    """Per-stage federation settings and checkpoint folders are the server's; the rest of the config the site's."""
    own = {"n": 64, "federation": {"local_steps": 5}}
    asked = {"n": 64, "federation": {"local_steps": 50}, "stage_checkpoints": {"vae": "/server/vae"}}
    node = {"partition-id": 0} | own_setup(tmp_path) | {"config-json": json.dumps(own)}
    settings = ClientSettings.from_context(toy_run_config(tmp_path, **{"config-json": json.dumps(asked)}), node)
    assert settings.refusal() is None and settings.config == asked
    changed = ClientSettings.from_context(toy_run_config(tmp_path, **{"config-json": json.dumps(asked | {"n": 8})}),
                                          node)
    assert "at 'n'" in str(changed.refusal())


def test_a_refusal_is_recognised_as_flower_deployment_wraps_it() -> None:
    """Simulation replies carry the refusal itself; a SuperNode wraps it as ``<class '…'>:<'…'>`` (seen in the
    stage=all deployment test before this was fixed: its refusal was recorded as a missing site)."""
    said = "site 1 refuses vae (round 1): the run asks DP off; this site's policy is DP on (ε=8)"
    assert REFUSAL.match(_short(said))
    assert REFUSAL.match(_short(f"<class 'echoflow.clients.policy.PolicyRefusal'>:<'{said}'>"))
    assert _short(f"<class 'echoflow.clients.policy.PolicyRefusal'>:<'{said}'>") == said
    assert not REFUSAL.match(_short("<class 'RuntimeError'>:<'CUDA out of memory; site 1 refuses nothing'>"))


def test_an_exported_run_config_names_no_data_folder_and_an_empty_one_says_nothing(tmp_path: Path) -> None:
    """The deployed app's declared default ``data-root = ""`` does not make a site with its own folder refuse."""
    out = tmp_path / "run.toml"
    result = CliRunner().invoke(app, ["simulate", "--export-run-config", str(out), "stage=all", f"workdir={tmp_path}"])
    assert result.exit_code == 0, result.output
    exported = tomllib.loads(out.read_text())
    assert exported["data-root"] == "" and all(c["data-root"] == "" for c in json.loads(exported["stages-json"]))
    node = {"partition-id": 0} | own_setup(tmp_path)
    assert ClientSettings.from_context(toy_run_config(tmp_path, **{"data-root": ""}), node).refusal() is None
