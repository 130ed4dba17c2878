"""`echoflow runs compare`: finished runs side by side (differing config keys, headline metrics)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from echoflow.cli.common import OVERRIDES
from echoflow.config import load_config
from echoflow.runs import HEADLINE, compare_runs, find_runs

runs_app = typer.Typer(help="Compare finished runs (MLflow) side by side.", no_args_is_help=True)


@runs_app.command("compare")
def compare(
    overrides: list[str] | None = OVERRIDES,
    name: str = typer.Option("pipeline", help="Run name: pipeline, simulate-vae, train-all, audit, …"),
    last: int = typer.Option(10, help="How many of the newest runs."),
    metric: list[str] = typer.Option(list(HEADLINE), help="Metric glob patterns to show (repeatable)."),
) -> None:
    """Show the newest runs named NAME in the config's MLflow experiment: config keys that differ, and metrics.

    E.g. after `echoflow pipeline --multirun dp=none,eps8`, `echoflow runs compare` lines up the two runs
    (`mlflow ui --backend-store-uri <mlflow.tracking_uri>` shows the same in MLflow's compare view).
    """
    cfg = load_config(overrides)
    result = compare_runs(find_runs(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, run_name=name, limit=last),
                          metrics=metric)
    table = Table("run", *result.params, *result.metrics, title=f"{name} runs in {cfg.mlflow.experiment}")
    for run_id, values in zip(result.run_ids, result.values, strict=True):
        table.add_row(run_id[:8], *(values[key] for key in [*result.params, *result.metrics]))
    Console().print(table)
