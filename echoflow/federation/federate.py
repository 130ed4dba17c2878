"""Federate one stage, or the stages in pipeline order, each starting from what the previous ones produced."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from omegaconf import DictConfig, OmegaConf

from echoflow.data.cohort import cohort_roots
from echoflow.errors import EchoFlowError
from echoflow.federation.config import run_config, simulation_config, site_config
from echoflow.federation.simulation import final_state, simulate_stages
from echoflow.server.checkpoint import FederationState, load_latest
from echoflow.stages import STAGES


def federate(cfg: DictConfig, stages: Sequence[str], *,
             per_stage: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, FederationState]:
    """Federate ``stages`` in order under ``cfg``; returns each stage's final state.

    Each stage gets its own checkpoint folder (``<federation.checkpoint_dir>/<stage>``) and MLflow run,
    nested under the caller's active MLflow run when there is one; later stages read earlier stages' latest
    round there. A re-run resumes each stage from its latest round; a stage whose rounds are all done is not
    simulated again. The stages still to run share one simulation (``cfg.federation``'s sites and Ray settings).
    Every site's own DP policy (``cfg.dp`` with the steps planned per stage) is its node config, not a message.

    Args:
        cfg: the composed config.
        stages: stage names (run in pipeline order).
        per_stage: config values for one stage only, as ``{stage: {"federation.local_steps": 50, ...}}``.
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise EchoFlowError(f"stage: unknown {unknown[0]!r}; choose from {', '.join(STAGES)} or all")
    # the phantom cohort is generated here on first use; sites read their own folder
    cohort_roots(cfg.data, workdir=Path(cfg.workdir), seed=cfg.seed)
    active = mlflow.active_run()
    parent = active.info.run_id if active is not None else ""
    configs: dict[str, dict[str, Any]] = {}
    planned: dict[str, int] = {}
    todo = []
    for stage in STAGES:
        stage_cfg = cfg.copy()
        for key, value in (per_stage or {}).get(stage, {}).items():
            OmegaConf.update(stage_cfg, key, value)
        planned[stage] = int(stage_cfg.federation.rounds) * int(stage_cfg.federation.local_steps)
        if stage not in stages:
            continue
        configs[stage] = run_config(stage_cfg, stage=stage, stage_checkpoints=stage_folders(cfg, before=stage),
                                    parent_run_id=parent)
        finished = load_latest(Path(configs[stage]["checkpoint-dir"])) if stage_cfg.federation.resume else None
        if finished is None or finished.round < stage_cfg.federation.rounds:
            todo.append(configs[stage])
    if todo:  # one simulation (one Ray start) for every stage still to federate
        simulate_stages(todo, simulation_config(cfg), site_config=site_config(cfg, planned))
    return {stage: final_state(Path(config["checkpoint-dir"])) for stage, config in configs.items()}


def stage_folders(cfg: DictConfig, *, before: str) -> dict[str, str]:
    """Checkpoint folders of the stages federated before stage ``before`` (each holds its rounds and ``LATEST``)."""
    return {s: str(Path(cfg.federation.checkpoint_dir) / s) for s in STAGES[: STAGES.index(before)]}


def stages_of(name: str) -> list[str]:
    """``"all"`` -> every stage in pipeline order; otherwise the one stage named."""
    return list(STAGES) if name == "all" else [name]
