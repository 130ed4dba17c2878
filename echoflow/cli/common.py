"""Options and helpers shared by the command files."""

from __future__ import annotations

import itertools

import typer
from hydra.core.override_parser.overrides_parser import OverridesParser

OVERRIDES = typer.Argument(None, help="Hydra overrides, e.g. `train.vae.optim.steps=500 data.sites=2`.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars (also off when stderr is not a terminal).")
MULTIRUN = typer.Option(False, "--multirun", "-m", help="Sweep comma lists, e.g. `dp=none,eps8` (one run each).")



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
