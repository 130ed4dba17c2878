"""Federate one stage, or the stages in pipeline order, each starting from what the previous ones produced."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from omegaconf import DictConfig, OmegaConf

from echoflow.centralized import cohort_roots
from echoflow.errors import EchoFlowError
from echoflow.federation.config import run_config, simulation_config
from echoflow.federation.simulation import simulate
from echoflow.server.checkpoint import FederationState, load_latest

#: Pipeline order (as in `echoflow.stages.STAGES`): the VAE first, since the latent stages encode with it.
STAGE_ORDER = ("vae", "image_flow", "reid", "video_flow", "ef")


def federate(cfg: DictConfig, stages: Sequence[str], *,
             per_stage: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, FederationState]:
    """Federate ``stages`` in order under ``cfg``; returns each stage's final state.

    Each stage gets its own checkpoint folder (``<federation.checkpoint_dir>/<stage>``) and MLflow run,
    nested under the caller's active MLflow run when there is one. A re-run resumes each stage from its
    latest round; a stage whose rounds are all done is not simulated again.

    Args:
        cfg: the composed config.
        stages: stage names (run in pipeline order).
        per_stage: config values for one stage only, as ``{stage: {"federation.local_steps": 50, ...}}``.
    """
    unknown = [s for s in stages if s not in STAGE_ORDER]
    if unknown:
        raise EchoFlowError(f"stage: unknown {unknown[0]!r}; choose from {', '.join(STAGE_ORDER)} or all")
    cohort_roots(cfg)  # the phantom cohort is generated here on first use; sites read their own folder
    active = mlflow.active_run()
    parent = active.info.run_id if active is not None else ""
    done: dict[str, str] = {}
    states: dict[str, FederationState] = {}
    for stage in sorted(stages, key=STAGE_ORDER.index):
        stage_cfg = cfg.copy()
        for key, value in (per_stage or {}).get(stage, {}).items():
            OmegaConf.update(stage_cfg, key, value)
        config = run_config(stage_cfg, stage=stage, stage_checkpoints=done, parent_run_id=parent)
        finished = load_latest(Path(config["checkpoint-dir"])) if stage_cfg.federation.resume else None
        if finished is None or finished.round < stage_cfg.federation.rounds:
            finished = simulate(config, simulation_config(stage_cfg))
        states[stage] = finished
        done[stage] = f"{config['checkpoint-dir']}/round_{finished.round:04d}"
    return states


def stages_of(name: str) -> list[str]:
    """``"all"`` -> every stage in pipeline order; otherwise the one stage named."""
    return list(STAGE_ORDER) if name == "all" else [name]
