"""`echoflow audit run --generated DIR [overrides]`: audit generated videos against every site, then release."""

from __future__ import annotations

from pathlib import Path

import typer

from echoflow.audit.decide import AuditFailedError
from echoflow.audit.report import log_to_mlflow
from echoflow.cli.common import OVERRIDES, apply_runtime
from echoflow.config import load_config
from echoflow.study.models import Cohort, Models
from echoflow.study.run import audit_settings, audit_videos
from echoflow.tracking import start_run

audit_app = typer.Typer(help="Privacy audit of generated samples before release.", no_args_is_help=True)


@audit_app.command("run")
def run(
    generated: Path = typer.Option(..., "--generated", help="Generated videos, EchoNet layout (`echoflow sample`)."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default <workdir>/audit/<generated name>)."),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Withhold every generated video with a frame too close to a real TRAIN frame of any site.

    The sites are the run's cohort. Each site's TRAIN frames are embedded by the trained VAE + re-id models
    and indexed (<workdir>/audit/indexes/<site>/); τ comes from the sites' held-out patients. Writes
    <out>/audit.json, <out>/audit.html and <out>/released/ (only the released videos, EchoNet layout), and logs
    both reports to MLflow. `audit.canaries=N` plants N transformed real frames; `audit.mode=federated` keeps
    each index at its site (Flower). Exit code 1 when any site fails: then nothing is released.
    """
    cfg = load_config(overrides)
    apply_runtime(cfg)
    target = out or Path(cfg.workdir) / "audit" / generated.resolve().name
    with start_run(cfg, "audit"):
        outcome = audit_videos(cfg, Models.load(cfg), Cohort.of(cfg), generated, target)
        log_to_mlflow(outcome.report, outcome.paths)
    counts = outcome.report["counts"]
    if outcome.result.failed:
        reasons = "; ".join(f"{k}: {v}" for k, v in outcome.result.failures.items())
        raise AuditFailedError(f"{target / 'audit.json'}: audit failed, nothing released ({reasons})")
    typer.echo(f"{len(outcome.released)}/{len(outcome.decisions)} videos released to {target / 'released'} "
               f"({counts['withheld']} of {counts['generated']} audited frames withheld); report {outcome.paths[1]}")
    if audit_settings(cfg).canaries:
        caught, planted = outcome.report["canaries"]["all"]["caught"], outcome.report["canaries"]["all"]["planted"]
        typer.echo(f"canaries caught: {caught}/{planted}")
