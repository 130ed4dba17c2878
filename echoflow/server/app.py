"""The Flower ServerApp: reads ``context.run_config`` and runs (or resumes) the federation.

Deployment: ``flwr run`` with this app (``echoflow.server.app:app``) and the run config in the app's
``pyproject.toml``; a run config with ``stages-json`` (a JSON list of per-stage run configs, written by
``echoflow simulate --export-run-config FILE stage=all``) federates those stages in turn in one run.
Simulation: `make_server_app(stages)` federates several stages in turn in one run, each
from its own run config (the engine passes none), so Ray and the site actors start once for all of them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from echoflow.federation.protocol import STAGES_JSON
from echoflow.server.loop import run_federation
from echoflow.server.settings import ServerSettings


def make_server_app(stages: Sequence[Mapping[str, Any]] = ({},)) -> ServerApp:
    """A ServerApp federating one stage per entry of ``stages``, in order; ``context.run_config`` overrides each."""
    app = ServerApp()
    configs = [dict(stage) for stage in stages]

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        given = dict(context.run_config)
        listed = json.loads(str(given.pop(STAGES_JSON, "") or "[]"))  # deployment: `--export-run-config stage=all`
        for base in configs:
            for stage in listed or [{}]:
                run_config = {**base, **given, **stage}
                run_federation(grid, ServerSettings.from_run_config(run_config), run_config)

    return app


app = make_server_app()
