"""The federation's server: ServerApp, strategies, resumable round loop, round checkpoints, MLflow logging."""

from echoflow.server.app import make_server_app
from echoflow.server.checkpoint import FederationState, load_latest, save_round
from echoflow.server.loop import run_federation, run_round
from echoflow.server.settings import ServerSettings, strategy_key
from echoflow.server.strategies import NAMES, StrategyConfig, make_strategy, strategy_state
from echoflow.server.tracking import RunTracker

__all__ = [
    "NAMES",
    "FederationState",
    "RunTracker",
    "ServerSettings",
    "StrategyConfig",
    "load_latest",
    "make_server_app",
    "make_strategy",
    "run_federation",
    "run_round",
    "save_round",
    "strategy_key",
    "strategy_state",
]
