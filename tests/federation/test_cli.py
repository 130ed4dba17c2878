"""`echoflow simulate --multirun`: each sweep point is an MLflow run with its config, federations nested."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import typer
from typer.testing import CliRunner

from echoflow.cli.simulate import simulate, sweep


def test_sweep_expands_comma_lists() -> None:
    assert sweep(["dp=none,eps8", "federation.sites=2"]) == [["dp=none", "federation.sites=2"],
                                                             ["dp=eps8", "federation.sites=2"]]


@pytest.mark.slow
def test_multirun_sweep_lands_as_mlflow_runs(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(simulate)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--multirun", "stage=vae", "dp=none,eps8", "federation.task=tests.federation.toy:TASK",
            "federation.sites=2", "federation.rounds=1", "federation.local_steps=3", "federation.num_cpus=1",
            f"workdir={tmp_path}", f"mlflow.tracking_uri={uri}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["echoflow"], output_format="list")
    parents = [r for r in runs if r.info.run_name == "simulate-vae"]
    children = [r for r in runs if r.info.run_name == "federate-vae"]
    assert sorted(r.data.params["dp.enabled"] for r in parents) == ["False", "True"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {r.info.run_id for r in parents}
