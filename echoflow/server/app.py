"""The Flower ServerApp: reads ``context.run_config`` and runs (or resumes) the federation.

Deployment: ``flwr run`` with this app (``echoflow.server.app:app``) and the run config in the app's
``pyproject.toml``. Simulation: `make_server_app(defaults)` supplies the run config the engine does not pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from echoflow.server.loop import run_federation
from echoflow.server.settings import ServerSettings


def make_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is ``defaults`` overridden by ``context.run_config``."""
    app = ServerApp()
    base = dict(defaults or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        run_config = {**base, **context.run_config}
        run_federation(grid, ServerSettings.from_run_config(run_config), run_config)

    return app


app = make_server_app()
