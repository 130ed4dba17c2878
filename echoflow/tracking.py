"""MLflow at the edge: every command's run carries its composed Hydra config as params and as a YAML artifact."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
from omegaconf import DictConfig, OmegaConf

from echoflow.config import to_yaml


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The config as dotted keys -> strings (MLflow params), e.g. ``{"train.vae.optim.steps": "3000"}``."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = str(node)[:500]

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def log_metrics(prefix: str) -> Callable[[int, dict[str, float]], None]:
    """A Trainer ``on_metrics`` callback logging ``<prefix>/<key>`` to the active MLflow run (no-op without one)."""

    def log(step: int, values: dict[str, float]) -> None:
        if mlflow.active_run() is not None:
            mlflow.log_metrics({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    return log


@contextmanager
def start_run(cfg: DictConfig, name: str) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run named ``name``, nested under the active run if there is one, with the config logged."""
    if mlflow.active_run() is None:
        mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
        mlflow.set_experiment(cfg.mlflow.experiment)
    with mlflow.start_run(run_name=name, nested=mlflow.active_run() is not None) as run:
        mlflow.log_params(flat_params(cfg))
        mlflow.log_text(to_yaml(cfg), "config.yaml")
        yield run
