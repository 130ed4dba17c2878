"""`echoflow simulate [stage=vae|…|all] [overrides] [--multirun]`: federate stages across simulated sites."""

from __future__ import annotations

import itertools

import typer
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from echoflow.cli.common import OVERRIDES
from echoflow.config import load_config
from echoflow.federation import federate, stages_of
from echoflow.tracking import start_run


def simulate(
    overrides: list[str] | None = OVERRIDES,
    multirun: bool = typer.Option(False, "--multirun", "-m", help="Sweep comma lists, e.g. `dp=none,eps8`."),
) -> None:
    """Federate a stage (default vae; `stage=all` runs every stage in order) on Flower's Ray simulation.

    Sites are `federation.sites` simulated hospitals; `dp=eps8` gives each site DP-SGD with ε=8 over the
    whole run; `strategy=fedprox|fedadam|fedmedian|krum…` picks the aggregation. A re-run resumes from the
    last round checkpoint. Each sweep point is one MLflow run (full config as params) with a nested run per
    stage, per-site metrics per round and the final global weights as an artifact.
    """
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


def sweep(overrides: list[str]) -> list[list[str]]:
    """Every combination of the comma-list (sweep) overrides, Hydra syntax: ``a=1,2 b=x`` -> 2 override lists."""
    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([str(override.input_line)])
    return [list(point) for point in itertools.product(*choices)]
