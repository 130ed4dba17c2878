"""`echoflow pipeline [overrides]`: the main job, end to end, resumable."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from echoflow.cli.common import MULTIRUN, OVERRIDES, sweep
from echoflow.config import apply_runtime, load_config
from echoflow.study.run import run_pipeline
from echoflow.study.summary import mae_cell, per_seed_cell
from echoflow.tracking import start_run


def pipeline(overrides: list[str] | None = OVERRIDES, multirun: bool = MULTIRUN) -> None:
    """Run the whole EchoFlow study: cohort, federated models, screened generation, audit, release, EF parity.

    Sites train the VAE, then (on the global VAE's latents) the image flow, re-id and video flow, federated.
    New latent frames are screened by re-id, animated at requested EFs, decoded, and audited frame by frame
    against every site; only what passes is released (<workdir>/audit/released, EchoNet layout). EF regressors
    trained on real, released-synthetic and both are tested on held-out real videos (a cohort of unseen patients
    with `data.test_patients`, else every site's TEST split). Results:
    <workdir>/summary/ and one MLflow run with a nested run per stage. Re-running after a crash resumes.
    With `--multirun`, each sweep point (e.g. `dp=none,eps8`) runs in <workdir>/sweep_NNN as its own MLflow
    run; `echoflow runs compare` lines them up.
    """
    points = sweep(list(overrides or [])) if multirun else [list(overrides or [])]
    for number, point in enumerate(points):
        if len(points) > 1:
            point = [*point, f"workdir={load_config(with_pipeline(point)).workdir}/sweep_{number:03d}"]
        run_one(with_pipeline(point))


def run_one(overrides: list[str]) -> None:
    """One pipeline run under ``overrides``, with its result table printed."""
    cfg = load_config(overrides)
    apply_runtime(cfg)
    with start_run(cfg, "pipeline"):
        summary = run_pipeline(cfg)
    console = Console()
    console.print(parity_table(summary["parity"]))
    for key, value in summary["headline"].items():
        console.print(f"{key}: {value}")
    console.print(f"summary: {cfg.workdir}/summary/summary.html; audit: {cfg.workdir}/audit/audit.html")


def parity_table(rows: list[dict[str, Any]]) -> Table:
    """The pooled rows of the summary's parity table; several regressor seeds add mean ± t 95 % and each seed's MAE."""
    pooled = [row for row in rows if row["tested on"] == "pooled"]
    seeded = any("seeds" in row for row in pooled)
    table = Table("trained on", "tested on", "MAE", "RMSE", "R²", *(("MAE per seed",) if seeded else ()),
                  title="EF regression on held-out real videos")
    for row in pooled:
        mae = mae_cell(row) if "seeds" in row else f"{row['mae']:.2f}"
        table.add_row(row["trained on"], row["tested on"], mae, f"{row['rmse']:.2f}", f"{row['r2']:.3f}",
                      *((per_seed_cell(row),) if seeded else ()))
    return table


def with_pipeline(overrides: list[str]) -> list[str]:
    """Add the ``pipeline`` config group (default ``demo``), which other commands do not compose.

    A pipeline config may set values of other groups too (``# @package _global_``), e.g. the cohort size.
    """
    chosen = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("pipeline=")]
    rest = [o for o in overrides if not o.lstrip("+").startswith("pipeline=")]
    return [f"+pipeline={chosen[-1] if chosen else 'demo'}", *rest]
