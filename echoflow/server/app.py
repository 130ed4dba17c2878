"""The Flower ServerApp: reads ``context.run_config`` and runs (or resumes) the federation.

Deployment: ``flwr run`` with this app (``echoflow.server.app:app``) and the run config in the app's
``pyproject.toml``. Simulation: `make_server_app(stages)` federates several stages in turn in one run, each
from its own run config (the engine passes none), so Ray and the site actors start once for all of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from echoflow.server.loop import run_federation
from echoflow.server.settings import ServerSettings


def make_server_app(stages: Sequence[Mapping[str, Any]] = ({},)) -> ServerApp:
    """A ServerApp federating one stage per entry of ``stages``, in order; ``context.run_config`` overrides each."""
    app = ServerApp()
    configs = [dict(stage) for stage in stages]

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        for base in configs:
            run_config = {**base, **context.run_config}
            run_federation(grid, ServerSettings.from_run_config(run_config), run_config)

    return app


app = make_server_app()
