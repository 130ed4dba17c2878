"""The server's half of the run config (flat Flower ``run_config`` keys), parsed into a typed object."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from echoflow.errors import EchoFlowError
from echoflow.server.strategies import StrategyConfig


@dataclass(frozen=True)
class ServerSettings:
    """What the ServerApp needs.

    Attributes:
        task, stage, config, seed: as for the clients (the server builds the stage once for initial weights).
        rounds: total rounds. strategy: aggregation. checkpoint_dir: round checkpoints. resume: continue from
        the latest checkpoint there. timeout_s: seconds to wait for replies per round. evaluate: federated
        evaluation after each round. mlflow_uri: tracking URI ('' = no MLflow). mlflow_experiment,
        mlflow_parent_run_id, run_name: where and how the run is logged. run_config: the whole run config,
        sent to the sites with every message (so one run can federate several stages in turn).
        min_sites: usable training replies a round needs, or it fails (`echoflow.server.roster`).
        max_update_ratio: reject an update whose delta norm exceeds this multiple of the round's median
        (0 = off; `echoflow.server.screening`).
    """

    task: str
    stage: str
    config: dict[str, Any]
    seed: int
    rounds: int
    strategy: StrategyConfig
    checkpoint_dir: Path
    resume: bool = True
    timeout_s: float = 3600.0
    evaluate: bool = True
    mlflow_uri: str = ""
    mlflow_experiment: str = "echoflow"
    mlflow_parent_run_id: str = ""
    run_name: str = "federation"
    run_config: dict[str, Any] = field(default_factory=dict)
    min_sites: int = 1
    max_update_ratio: float = 10.0

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ServerSettings:
        """Parse the run config; strategy fields come from ``strategy`` and ``strategy-<field-with-dashes>``."""
        try:
            strategy = StrategyConfig(
                name=str(run_config.get("strategy", "fedavg")),
                **{f.name: _cast(f.default, run_config[key])
                   for f in fields(StrategyConfig) if f.name != "name" and (key := strategy_key(f.name)) in run_config},
            )
            return cls(
                task=str(run_config["task"]),
                stage=str(run_config["stage"]),
                config=json.loads(str(run_config.get("config-json", "{}"))),
                seed=int(run_config.get("seed", 0)),
                rounds=int(run_config["rounds"]),
                strategy=strategy,
                checkpoint_dir=Path(str(run_config["checkpoint-dir"])),
                resume=bool(run_config.get("resume", True)),
                timeout_s=float(run_config.get("timeout-s", 3600.0)),
                evaluate=bool(run_config.get("evaluate", True)),
                mlflow_uri=str(run_config.get("mlflow-uri", "")),
                mlflow_experiment=str(run_config.get("mlflow-experiment", "echoflow")),
                mlflow_parent_run_id=str(run_config.get("mlflow-parent-run-id", "")),
                run_name=str(run_config.get("run-name", "federation")),
                run_config=dict(run_config),
                min_sites=int(run_config.get("min-sites", 1)),
                max_update_ratio=float(run_config.get("max-update-ratio", 10.0)),
            )
        except KeyError as err:
            raise EchoFlowError(f"run_config: missing key {err}") from err


def strategy_key(field_name: str) -> str:
    """The run-config key of a `StrategyConfig` field, e.g. ``proximal_mu`` -> ``strategy-proximal-mu``."""
    return "strategy-" + field_name.replace("_", "-")



def _cast(default: Any, value: Any) -> Any:
    """``value`` as the type of the field's default (run configs carry TOML/CLI scalars)."""
    return type(default)(value)
