"""Global round checkpoints: one folder per round (safetensors + JSON) and a ``LATEST`` pointer.

A round's folder is complete before ``LATEST`` (renamed atomically) points at it, so a crash at any moment
leaves the previous round resumable. The two newest rounds are kept.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from echoflow.checkpoints import LATEST, latest_round, load_checkpoint, save_checkpoint

KEEP = 2


@dataclass
class FederationState:
    """Everything the server needs to continue after round ``round``.

    Attributes:
        round: last completed round (0 = nothing yet). arrays: global weights ``"<group>.<param>"``.
        strategy: the strategy's tensors by attribute (e.g. FedAdam's ``m_t``/``v_t``), flattened as
            ``"<attr>/<key>"``. sites: per site (str index) its latest metrics (epsilon, budget-exhausted, …).
        history: one entry per round: ``{"round", "wall_s", "train", "evaluate", "sites"}``.
        run_config: the run config the federation was started with. mlflow_run_id: its MLflow run, if any.
    """

    round: int
    arrays: dict[str, Tensor]
    strategy: dict[str, Tensor] = field(default_factory=dict)
    sites: dict[str, dict[str, float]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    run_config: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors (for safetensors) and JSON metadata."""
        tensors = {f"global/{k}": v for k, v in self.arrays.items()} | {
            f"strategy/{k}": v for k, v in self.strategy.items()
        }
        meta = {"round": self.round, "sites": self.sites, "history": self.history, "run_config": self.run_config,
                "mlflow_run_id": self.mlflow_run_id}
        return tensors, meta

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> FederationState:
        """Inverse of `state_dict`."""
        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        return cls(round=int(meta["round"]), arrays=part("global/"), strategy=part("strategy/"), sites=meta["sites"],
                   history=meta["history"], run_config=meta["run_config"], mlflow_run_id=meta.get("mlflow_run_id"))


def save_round(directory: Path, state: FederationState) -> Path:
    """Write ``directory/round_NNNN`` and point ``LATEST`` at it; returns the round folder."""
    folder = directory / f"round_{state.round:04d}"
    tensors, meta = state.state_dict()
    save_checkpoint(folder, tensors, meta)
    pointer = directory / (LATEST + ".tmp")
    pointer.write_text(folder.name)
    pointer.replace(directory / LATEST)
    for old in sorted(directory.glob("round_*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_latest(directory: Path) -> FederationState | None:
    """The newest complete round in ``directory``, or None when there is none."""
    folder = latest_round(directory)
    if folder is None:
        return None
    tensors, meta = load_checkpoint(folder)
    return FederationState.from_state_dict(tensors, meta)
