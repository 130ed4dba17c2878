"""What a site trains: a `SiteTask` names the stage's networks and the site's datasets.

The ClientApp and the ServerApp find the task through a dotted path in the run config (``"task"``), e.g.
``"echoflow.stages:TASK"``, so the same apps run any stage — and a toy in tests — in simulation and deployment.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor
from torch.utils.data import Dataset

from echoflow.errors import EchoFlowError
from echoflow.stages.trainer import Batch, Stage


class SiteTask(Protocol):
    """Builds a stage and a site's data; ``config`` is the resolved EchoFlow config as a plain dict."""

    def build_stage(self, name: str, config: Mapping[str, Any]) -> Stage:
        """A fresh stage ``name`` (``vae``, ``image_flow``, …) with deterministic initial weights."""
        ...

    def site_data(
        self, name: str, site_dir: Path, config: Mapping[str, Any]
    ) -> tuple[Dataset[Batch], Dataset[Batch]]:
        """The site's (train, validation) datasets for stage ``name``, read from ``site_dir``."""
        ...


def load_task(path: str) -> SiteTask:
    """Import ``"package.module:attribute"``."""
    module_name, _, attribute = path.partition(":")
    try:
        task = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise EchoFlowError(f"task {path!r}: cannot import ({err})") from err
    return task


def group_arrays(stage: Stage) -> dict[str, Tensor]:
    """All groups' weights as one flat dict ``"<group>.<param>" -> tensor`` (what the federation exchanges)."""
    groups = stage.groups().items()
    return {f"{g}.{k}": v.detach().cpu().clone() for g, net in groups for k, v in net.state_dict().items()}


def load_group_arrays(stage: Stage, arrays: Mapping[str, Tensor]) -> None:
    """Inverse of `group_arrays`: load every group's weights from the flat dict."""
    for group, net in stage.groups().items():
        prefix = f"{group}."
        state = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise EchoFlowError(f"stage {stage.name}: global weights do not fit group {group!r} ({err})") from err
