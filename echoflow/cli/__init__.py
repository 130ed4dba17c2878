"""The `echoflow` command: a thin layer over library functions, one file per command group."""

from __future__ import annotations

import os
import sys

import typer

from echoflow.cli.audit import audit_app
from echoflow.cli.common import QUIET
from echoflow.cli.config import config_app
from echoflow.cli.data import data_app
from echoflow.cli.evaluate import evaluate_app
from echoflow.cli.export import export_app
from echoflow.cli.pipeline import pipeline
from echoflow.cli.runs import runs_app
from echoflow.cli.sample import sample
from echoflow.cli.simulate import simulate
from echoflow.cli.train import train
from echoflow.config import limit_threads
from echoflow.errors import EchoFlowError
from echoflow.progress import QUIET_ENV

app = typer.Typer(
    name="echoflow",
    help=(
        "EchoFlow: privacy-preserving synthetic echocardiography, trained across hospital sites.\n\n"
        "Protocol: 1) `echoflow data` builds or ingests each site's cohort; 2) `echoflow train` / "
        "`echoflow simulate` train the VAE, latent flows, re-id and EF models; 3) `echoflow sample` generates; "
        "4) `echoflow audit run` withholds anything too close to a real patient; 5) `echoflow pipeline` "
        "does all of it and compares EF regression on real vs synthetic videos; 6) `echoflow runs compare` lines "
        "up runs (e.g. dp=none vs dp=eps8)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def options(quiet: bool = QUIET) -> None:
    """Options for every command (e.g. `echoflow --quiet pipeline`)."""
    if quiet:  # every progress bar asks echoflow.progress, which reads the environment
        os.environ[QUIET_ENV] = "1"


app.add_typer(data_app, name="data")
app.command()(train)
app.command()(sample)
app.command()(simulate)
app.command()(pipeline)
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(audit_app, name="audit")
app.add_typer(export_app, name="export")
app.add_typer(config_app, name="config")
app.add_typer(runs_app, name="runs")


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 1."""
    limit_threads(1)  # commands with a config raise it to `threads`
    try:
        app()
    except EchoFlowError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)


__all__ = ["app", "main"]
