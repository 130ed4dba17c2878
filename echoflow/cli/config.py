"""`echoflow config show [overrides] [--keys]`: the composed Hydra config, or every key with its comment."""

from __future__ import annotations

from typing import Annotated

import typer

from echoflow.cli.common import OVERRIDES

config_app = typer.Typer(help="Discover the configuration: composed values and what every key means.",
                         no_args_is_help=True)


@config_app.command("show")
def show(
    overrides: list[str] | None = OVERRIDES,
    keys: Annotated[bool, typer.Option("--keys", help="One line per leaf key: value and its comment.")] = False,
) -> None:
    """Print the config that `echoflow <command> [overrides]` would run with (YAML, interpolations resolved)."""
    from echoflow.config import load_config, to_yaml
    from echoflow.config_docs import composed_keys, format_keys, group_choices

    cfg = load_config(overrides)
    if not keys:
        typer.echo(to_yaml(cfg), nl=False)
        return
    for line in format_keys(composed_keys(cfg, group_choices(list(overrides or [])))):
        typer.echo(line)


@config_app.command("reference")
def reference() -> None:
    """Print every key of every config file with its meaning, as Markdown (docs/configuration.md)."""
    from echoflow.config_docs import reference_markdown

    typer.echo(reference_markdown(), nl=False)
