"""`echoflow train STAGE [overrides]`: train stages centrally on the run's cohort."""

from __future__ import annotations

import typer

from echoflow.cli.common import OVERRIDES, QUIET
from echoflow.config import apply_runtime, load_config
from echoflow.stages import STAGES
from echoflow.study.centralized import train_stages
from echoflow.study.models import Cohort
from echoflow.tracking import start_run


def train(
    stage: str = typer.Argument(..., help=f"Which network to train: {', '.join(STAGES)}, or `all` in that order."),
    overrides: list[str] | None = OVERRIDES,
    quiet: bool = QUIET,
) -> None:
    """Train EchoFlow stages on the TRAIN split of every site, pooled (the centralized baseline).

    The latent stages (image_flow, reid, video_flow) encode the videos with the trained VAE first, so train
    `vae` before them. Re-running resumes from the last checkpoint in <workdir>/<stage>/.
    """
    names = list(STAGES) if stage == "all" else [stage]
    if not set(names) <= set(STAGES):
        raise typer.BadParameter(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)} or all")
    cfg = load_config(overrides)
    apply_runtime(cfg)
    with start_run(cfg, f"train-{stage}"):
        for name in train_stages(cfg, names, Cohort.of(cfg), quiet=quiet):
            typer.echo(f"{name}: trained; weights in {cfg.workdir}/{name}/model.safetensors")
