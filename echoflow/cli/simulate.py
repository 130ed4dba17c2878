"""`echoflow simulate [stage=vae|…|all] [overrides] [--multirun]`: federate stages across simulated sites."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from omegaconf import OmegaConf

from echoflow.cli.common import MULTIRUN, OVERRIDES, sweep
from echoflow.config import load_config
from echoflow.errors import EchoFlowError
from echoflow.federation.config import run_config, run_config_toml
from echoflow.federation.federate import federate, stage_folders, stages_of
from echoflow.federation.protocol import STAGES_JSON
from echoflow.tracking import start_run


def simulate(
    overrides: list[str] | None = OVERRIDES,
    multirun: bool = MULTIRUN,
    export_run_config: Path | None = typer.Option(
        None, "--export-run-config", help="Write the stage's Flower run config (TOML) for `flwr run deploy` and exit."),
) -> None:
    """Federate a stage (default vae; `stage=all` runs every stage in order) on Flower's Ray simulation.

    Sites are `federation.sites` simulated hospitals; `dp=eps8` gives each site DP-SGD with ε=8 over the
    whole run; `strategy=fedprox|fedadam|fedmedian|krum…` picks the aggregation. A re-run resumes from the
    last round checkpoint. Each sweep point is one MLflow run (full config as params) with a nested run per
    stage, per-site metrics per round and the final global weights as an artifact. With `--export-run-config`,
    nothing is simulated: the run config of one stage is written for a real deployment (docs/deployment.md).
    """
    if export_run_config is not None:
        export(list(overrides or []), export_run_config)
        return
    points = sweep(list(overrides or [])) if multirun else [list(overrides or [])]
    for number, point in enumerate(points):
        stage = next((o.split("=", 1)[1] for o in point if o.startswith("stage=")), "vae")
        cfg = load_config([o for o in point if not o.startswith("stage=")])
        if len(points) > 1:  # each sweep point is its own federation: own checkpoints and site ledgers
            for key in ("checkpoint_dir", "state_root"):
                OmegaConf.update(cfg, f"federation.{key}", f"{cfg.federation[key]}/sweep_{number:03d}")
        with start_run(cfg, f"simulate-{stage}"):
            states = federate(cfg, stages_of(stage))
        for name, state in states.items():
            eps = max((site.get("epsilon", 0.0) for site in state.sites.values()), default=0.0)
            typer.echo(f"{name}: {state.round} rounds, max site ε {eps:.2f}, checkpoints in "
                       f"{cfg.federation.checkpoint_dir}/{name}  [{' '.join(point)}]")


def export(overrides: list[str], path: Path) -> None:
    """Write the run config of the stage named by ``stage=...`` (default vae) under ``overrides`` to ``path``.

    ``stage=all``: the first stage's run config plus ``stages-json``, every stage's run config in order, so one
    ``flwr run`` federates them all (the server sends each latent stage the VAE's final weights in its messages).
    """
    stage = next((o.split("=", 1)[1] for o in overrides if o.startswith("stage=")), "vae")
    if stage != "all" and stage not in stages_of("all"):
        raise EchoFlowError(f"stage: --export-run-config needs a stage or all, got {stage!r}")
    cfg = load_config([o for o in overrides if not o.startswith("stage=")])
    configs = [run_config(cfg, stage=s, stage_checkpoints=stage_folders(cfg, before=s)) | {"data-root": ""}
               for s in stages_of(stage)]  # a site's data folder is its own node config, never the server's
    config = configs[0] | ({STAGES_JSON: json.dumps(configs)} if stage == "all" else {})
    path.write_text(run_config_toml(config))
    typer.echo(f"{path}: run config of stage {stage}")
