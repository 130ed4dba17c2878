"""`echoflow simulate --multirun`: each sweep point is an MLflow run with its config, federations nested."""

from __future__ import annotations

import itertools
import json
import tomllib
from pathlib import Path

import mlflow
import pytest
import typer
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from typer.testing import CliRunner

from echoflow.cli.common import sweep
from echoflow.cli.simulate import simulate
from echoflow.server.checkpoint import load_latest

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus' RDP orders, restated
SITES, ROUNDS = 3, 3


def test_sweep_expands_comma_lists() -> None:
    assert sweep(["dp=none,eps8", "federation.sites=2"]) == [["dp=none", "federation.sites=2"],
                                                             ["dp=eps8", "federation.sites=2"]]


def test_exported_run_config_fits_the_deployed_app(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(simulate)
    out = tmp_path / "run.toml"
    result = CliRunner().invoke(app, ["--export-run-config", str(out), "stage=vae", "dp=eps8", "strategy=fedprox",
                                      f"workdir={tmp_path}"])
    assert result.exit_code == 0, result.output
    exported = tomllib.loads(out.read_text())
    declared = tomllib.loads((Path(__file__).parents[2] / "deploy" / "pyproject.toml").read_text())
    defaults = declared["tool"]["flwr"]["app"]["config"]
    assert set(exported) <= set(defaults)  # `flwr run --run-config` only overrides declared keys
    assert all(type(exported[k]) is type(defaults[k]) for k in exported), "TOML types differ from the app's"
    assert exported["dp-enabled"] is True and exported["dp-epsilon"] == 8.0 and exported["strategy"] == "fedprox"
    assert json.loads(exported["config-json"])["dp"]["epsilon"] == 8.0


@pytest.mark.slow
def test_multirun_dp_sweep_gives_comparable_mlflow_runs_and_accounted_epsilon(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(simulate)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--multirun", "stage=vae", "dp=none,eps8", "federation.task=tests.federation.toy:TASK",
            f"federation.sites={SITES}", f"federation.rounds={ROUNDS}", "federation.local_steps=3",
            "federation.num_cpus=1", "data.sites=1", "data.patients_per_site=1", "data.size=32", "data.frames=16",
            f"workdir={tmp_path}", f"mlflow.tracking_uri={uri}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    # MLflow: two sweep runs with their configs, each with a nested federation whose metrics compare side by side
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["echoflow"])
    parents = runs[runs["tags.mlflow.runName"] == "simulate-vae"]
    children = runs[runs["tags.mlflow.runName"] == "federate-vae"].set_index("params.dp-enabled")
    assert sorted(parents["params.dp.enabled"]) == ["False", "True"]
    assert set(children["tags.mlflow.parentRunId"]) == set(parents["run_id"])
    assert children.loc["False", "metrics.epsilon_max"] == 0.0 < children.loc["True", "metrics.epsilon_max"] <= 8.0
    assert children.loc["False", ["metrics.train_loss", "metrics.eval_loss"]].notna().all()
    assert children.loc["True", ["metrics.train_loss", "metrics.eval_loss"]].isna().all()  # DP sites send no loss

    # dp=eps8: every site's cumulative ε grows each round, ends <= the VAE's share of 8 (dp.plan) and equals a
    # recomputation from its logged (noise multiplier, sample rate, steps)
    state = load_latest(tmp_path / "federation" / "sweep_001" / "vae")
    assert state is not None and state.round == ROUNDS
    client = mlflow.MlflowClient(uri)
    for site in map(str, range(SITES)):
        logged = [entry["sites"][site] for entry in state.history]
        epsilons = [m["epsilon"] for m in logged]
        assert all(b > a for a, b in itertools.pairwise(epsilons)) and epsilons[-1] <= 8.0 * 0.3 + 1e-9, epsilons
        for m in logged:
            rdp = compute_rdp(q=m["dp-sample-rate"], noise_multiplier=m["dp-noise-multiplier"],
                              steps=int(m["dp-steps"]), orders=ORDERS)
            assert get_privacy_spent(orders=ORDERS, rdp=rdp, delta=m["dp-delta"])[0] == pytest.approx(m["epsilon"])
        history = client.get_metric_history(str(state.mlflow_run_id), f"site_{int(site):02d}/epsilon")
        assert [h.value for h in sorted(history, key=lambda h: h.step)] == pytest.approx(epsilons)
