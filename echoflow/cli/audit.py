"""`echoflow audit`: ``run --generated DIR`` audits and releases; ``index --site DIR`` builds a site's index.

``run`` audits generated videos against every site, then releases what passes; ``index`` lets a deployed site
build its own audit folder (for a federated audit) from its own data.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import typer

from echoflow.audit.decide import AuditFailedError
from echoflow.audit.report import log_to_mlflow
from echoflow.audit.site_index import build_site_index
from echoflow.cli.common import OVERRIDES
from echoflow.config import apply_runtime, load_config
from echoflow.models.vae import AdversarialVAE
from echoflow.study.models import Cohort, Models, trained_network
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


@audit_app.command("index")
def index(
    site: Path = typer.Option(..., "--site", help="This site's data folder (EchoNet layout, TRAIN + VAL/TEST)."),
    out: Path | None = typer.Option(None, "--out", help="Its audit folder (default <site>/audit_index)."),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Build this site's audit folder from its own data, for a federated audit (node config audit-site-dir).

    Embeds the site's TRAIN frames (indexed) and held-out frames (calibration) with the global VAE and re-id
    weights of `workdir` (<workdir>/vae and <workdir>/reid, as `echoflow pipeline` or the federation wrote them).
    Nothing leaves the site.
    """
    cfg = load_config(overrides)
    apply_runtime(cfg)
    target = out or site / "audit_index"
    vae = cast(AdversarialVAE, trained_network(cfg, "vae"))
    auditor = build_site_index(vae, trained_network(cfg, "reid"), site, target, size=int(cfg.data.size),
                               settings=audit_settings(cfg))
    typer.echo(f"{target}: {auditor.index.kind} index of {auditor.index.ntotal} TRAIN frames, "
               f"{len(auditor.heldout)} held-out frames for calibration")
