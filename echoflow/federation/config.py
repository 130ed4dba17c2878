"""Hydra at the edge: the composed config becomes a flat Flower run config and a `SimulationConfig`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from echoflow.federation.simulation import SimulationConfig
from echoflow.server.settings import strategy_key
from echoflow.server.strategies import StrategyConfig


def run_config(
    cfg: DictConfig, *, stage: str, stage_checkpoints: Mapping[str, str] | None = None, parent_run_id: str = ""
) -> dict[str, Any]:
    """The flat run config (Flower ``run_config`` keys) for federating ``stage`` under ``cfg``.

    Args:
        cfg: the composed EchoFlow config (groups ``federation``, ``dp``, ``strategy``, ``data``, ``model``…).
        stage: the stage to train.
        stage_checkpoints: checkpoint folders of earlier stages (``{"vae": "<checkpoint_dir>/vae"}``), passed to
            the task as ``config["stage_checkpoints"]`` (the latent stages encode with the latest global VAE).
        parent_run_id: MLflow run to nest under ('' = top level).
    """
    fed, dp, strategy = cfg.federation, cfg.dp, cfg.strategy
    resolved = {**_resolved(cfg), "stage_checkpoints": dict(stage_checkpoints or {})}
    config: dict[str, Any] = {
        "task": fed.task, "stage": stage, "config-json": json.dumps(resolved), "seed": int(cfg.seed),
        "rounds": int(fed.rounds), "local-steps": int(fed.local_steps), "batch-size": int(fed.batch_size),
        "lr": float(fed.lr), "data-root": _data_root(cfg),
        "checkpoint-dir": str(Path(fed.checkpoint_dir) / stage),
        "resume": bool(fed.resume), "evaluate": bool(fed.evaluate), "timeout-s": float(fed.timeout_s),
        "min-sites": int(fed.min_sites), "max-update-ratio": float(fed.max_update_ratio),
        "secagg": bool(fed.secagg),
        # what the server expects of the sites' DP; each site checks it against its own policy (`site_config`)
        "dp-enabled": bool(dp.enabled), "dp-epsilon": float(dp.epsilon), "dp-delta": float(dp.delta),
        "dp-max-grad-norm": float(dp.max_grad_norm), "strategy": str(strategy.name),
        "mlflow-uri": str(cfg.mlflow.tracking_uri), "mlflow-experiment": str(cfg.mlflow.experiment),
        "mlflow-parent-run-id": parent_run_id, "run-name": f"federate-{stage}",
    }
    for f in fields(StrategyConfig):
        if f.name != "name" and f.name in strategy:
            config[strategy_key(f.name)] = strategy[f.name]
    return config


def site_config(cfg: DictConfig, planned_steps: Mapping[str, int]) -> dict[str, Any]:
    """What every simulated site holds as its own node config: task, data root, training config, ledger, DP.

    The simulation bakes this into the sites' ClientApp (`echoflow.clients.app.make_client_app`); in a deployment
    each SuperNode's ``--node-config`` carries the same keys (`echoflow.clients.policy`). Never sent in a message:
    a message naming another task, data root or config (outside the server's per-stage keys) is refused.

    Args:
        cfg: the composed config (groups ``dp`` and ``federation``).
        planned_steps: stage -> rounds x local steps the site plans to train it (its noise is calibrated for them).
    """
    config: dict[str, Any] = {"state-dir": str(cfg.federation.state_root), "task": str(cfg.federation.task),
                              "data-root": _data_root(cfg), "config-json": json.dumps(_resolved(cfg))}
    dp = cfg.dp
    if not dp.enabled:
        return config
    plan = {str(k): float(v) for k, v in cast(dict, OmegaConf.to_container(dp.plan, resolve=True)).items()}
    config |= {"dp-enabled": True, "dp-epsilon": float(dp.epsilon), "dp-delta": float(dp.delta),
               "dp-max-grad-norm": float(dp.max_grad_norm), "dp-plan": json.dumps(plan),
               "dp-planned-steps": json.dumps({str(k): int(v) for k, v in planned_steps.items()})}
    if dp.get("secret_seed") is not None:
        config["dp-secret-seed"] = int(dp.secret_seed)
    return config


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))


def _data_root(cfg: DictConfig) -> str:
    return str(Path(cfg.workdir) / "cohort")


def run_config_toml(config: Mapping[str, Any]) -> str:
    """A flat run config as TOML (``key = value`` lines) for ``flwr run <app> <link> --run-config FILE``."""
    lines = []
    for key, value in config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(float(value)) if isinstance(value, float) else str(value)
        else:
            text = json.dumps(str(value))  # a JSON string literal is a valid TOML basic string
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def simulation_config(cfg: DictConfig) -> SimulationConfig:
    """The Ray simulation settings of ``cfg.federation``."""
    fed = cfg.federation
    return SimulationConfig(sites=int(fed.sites), client_cpus=float(fed.client_cpus), num_cpus=int(fed.num_cpus),
                            ray_address=str(fed.ray_address or ""), object_store_mb=int(fed.object_store_mb),
                            verbose=bool(fed.verbose))
