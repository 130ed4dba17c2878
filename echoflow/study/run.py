"""The main job: cohort → federated EchoFlow → screened generation → audit → release → EF-regression parity.

Every step writes its outputs under ``<workdir>`` and a marker ``<workdir>/pipeline/<step>.json``; a re-run skips
marked steps and resumes the unfinished one (federated stages resume from their last round checkpoint, regressors
from their last training checkpoint). Everything is one MLflow parent run with a nested run per stage.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import mlflow
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from echoflow.audit.decide import AuditFailedError
from echoflow.audit.embed import embed
from echoflow.audit.run import AuditOutcome, AuditSettings, RealSite, embed_sites, index_and_decide, run_audit
from echoflow.config import plain
from echoflow.federation.federate import federate
from echoflow.models.vae import AdversarialVAE
from echoflow.stages import GENERATIVE
from echoflow.stages.networks import build_network, save_network
from echoflow.study.centralized import train_stages
from echoflow.study.evaluate import parity_study
from echoflow.study.generate import Sampling, generate_videos, write_synthetic
from echoflow.study.models import Cohort, Models, stage_folder
from echoflow.study.protocol import draw_efs
from echoflow.study.summary import write_summary
from echoflow.study.timing import StepTimes, federated_stage_seconds, write_timing


def once(cfg: DictConfig, step: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``work`` unless ``<workdir>/pipeline/<step>.json`` records it as done; return its record.

    The record is always the one read back from the marker, so a fresh and a resumed run see the same values.
    """
    marker = Path(cfg.workdir) / "pipeline" / f"{step}.json"
    if not marker.exists():
        record = work()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(record, indent=1))
    return cast(dict[str, Any], json.loads(marker.read_text()))


def export_global(cfg: DictConfig, stage: str, arrays: Mapping[str, Tensor]) -> None:
    """Write a federated stage's final global ``model`` weights (``"model.<param>"`` arrays) where `Models` looks."""
    net = build_network(stage, plain(cfg.model))
    net.load_state_dict({k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")})
    save_network(net, stage_folder(cfg, stage) / "model.safetensors")


def train_models(cfg: DictConfig, cohort: Cohort) -> dict[str, Any]:
    """Train the four EchoFlow stages; returns rounds, latent scale and per-site loss history.

    ``pipeline.training=federated`` (default): the sites federate the stages in order — the VAE first (the
    federation pools the sites' latent moments into its latent scale), then the latent stages on the global
    VAE's latents, encoded at each site, then an EF regressor on their real videos (a parity baseline that never
    pools data). ``centralized``: the baseline on the pooled TRAIN split (resuming, or reusing finished, models
    in ``<workdir>/<stage>/``); it has no rounds.
    """
    cfg = scaled_training(cfg)
    if cfg.pipeline.training == "centralized":
        vae = train_stages(cfg, GENERATIVE, cohort)["vae"]
        return {"latent_scale": float(cast(AdversarialVAE, vae).latent_scale), "rounds": {}, "history": {}}
    per_stage = {stage: dict(values) for stage, values in cfg.pipeline.federation.items()}
    states = federate(cfg, [*GENERATIVE, "ef"], per_stage=per_stage)
    for stage, state in states.items():
        export_global(cfg, stage, state.arrays)
    return {"latent_scale": float(states["vae"].arrays["model.latent_scale"]),
            "rounds": {s: st.round for s, st in states.items()},
            "history": {s: st.history for s, st in states.items()}}


def scaled_training(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the generative stages' training steps × ``pipeline.train_scale`` (the scaling sweep's steps axis).

    Federated: each stage's local steps per round (rounds stay, so the number of averagings does too);
    centralized: each stage's ``train.<stage>.optim.steps``. The EF regressors are the evaluation's recipe: unscaled.
    """
    scale, scaled = float(cfg.pipeline.train_scale), cfg.copy()
    for stage in GENERATIVE:
        OmegaConf.update(scaled, f"train.{stage}.optim.steps", round(cfg.train[stage].optim.steps * scale))
        per_stage = scaled.pipeline.federation.get(stage)
        if per_stage is not None and "federation.local_steps" in per_stage:
            per_stage["federation.local_steps"] = round(per_stage["federation.local_steps"] * scale)
    return scaled


def requested_efs(cfg: DictConfig, cohort: Cohort, n: int, generator: torch.Generator) -> torch.Tensor:
    """EFs to animate at (`draw_efs`), drawn by ``pipeline.ef``.

    ``histogram``: a smoothed, optionally noised histogram of the sites' TRAIN EFs (no real EF value is copied);
    ``uniform``: uniform over ``pipeline.ef_range``.
    """
    p = cfg.pipeline
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator)))
    train = [r.ef for site in cohort.split("TRAIN") for r in site.records] if p.ef == "histogram" else []
    return torch.from_numpy(draw_efs(train, n, source=p.ef, rng=rng, ef_range=tuple(p.ef_range),
                                     noise=float(p.ef_noise))).float()


def synthetic_count(cfg: DictConfig, cohort: Cohort) -> int:
    """Videos to generate: ``pipeline.synthetic_factor`` x the real TRAIN videos, or ``pipeline.videos`` if unset."""
    factor = cfg.pipeline.get("synthetic_factor")
    if factor is None:
        return int(cfg.pipeline.videos)
    return max(1, round(float(factor) * sum(len(site.records) for site in cohort.split("TRAIN"))))


def embed_real(cfg: DictConfig, models: Models, cohort: Cohort) -> dict[str, RealSite]:
    """Every site's real TRAIN and held-out frames in re-id space: what screening and the audit compare with."""
    return embed_sites(models.vae, models.reid, cohort.split("TRAIN"), cohort.split("VAL", "TEST"),
                       audit_settings(cfg))


def audit_settings(cfg: DictConfig) -> AuditSettings:
    """The ``audit`` config group, typed."""
    return AuditSettings.from_config(cast(dict, plain(cfg.audit)))


def generate(cfg: DictConfig, models: Models, cohort: Cohort, real: Mapping[str, RealSite]) -> dict[str, Any]:
    """Sample ~``oversample``× the target latent frames, screen them with re-id, animate survivors, decode, write."""
    p = cfg.pipeline

    def screen(frames: torch.Tensor) -> np.ndarray:
        _, screened, _ = index_and_decide(real, embed(models.reid, frames).numpy(), audit_settings(cfg),
                                          Path(cfg.workdir) / "audit" / "indexes")
        if screened.failed:
            raise AuditFailedError(f"screening: sites failed: {screened.failures}")
        return screened.release

    out = generate_videos(models, synthetic_count(cfg, cohort), lambda n, g: requested_efs(cfg, cohort, n, g),
                          Sampling.of(cfg, frames=p.frames), generator=torch.Generator().manual_seed(cfg.seed),
                          oversample=p.oversample, screen=screen)
    write_synthetic(Path(cfg.workdir) / "generated", out.videos, out.ef, fps=cfg.data.clip_fps)
    return {"drawn": out.drawn, "screened_out": out.screened_out, "animated": len(out.videos)}


def audit_videos(cfg: DictConfig, models: Models, cohort: Cohort, generated: Path, out: Path,
                 real: Mapping[str, RealSite] | None = None) -> AuditOutcome:
    """The full audit of every generated frame in ``generated`` against every site; releases what passes."""
    return run_audit(vae=models.vae, reid=models.reid, train=cohort.split("TRAIN"),
                     heldout=cohort.split("VAL", "TEST"), generated_dir=generated, out=out,
                     index_dir=Path(cfg.workdir) / "audit" / "indexes", settings=audit_settings(cfg), real=real)


def audit(cfg: DictConfig, models: Models, cohort: Cohort, real: Mapping[str, RealSite]) -> dict[str, Any]:
    """The pipeline's audit of ``<workdir>/generated``; fails the run (nothing released) when a site fails."""
    outcome = audit_videos(cfg, models, cohort, Path(cfg.workdir) / "generated", Path(cfg.workdir) / "audit", real)
    if outcome.result.failed:
        raise AuditFailedError(f"{outcome.paths[0]}: audit failed, nothing released ({outcome.result.failures})")
    return {"released": len(outcome.released), "videos": len(outcome.decisions), "counts": outcome.report["counts"],
            "report": [str(path) for path in outcome.paths]}


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """The whole main job under one MLflow parent run (the caller starts it); returns the summary.

    Each step's wall time goes to ``<workdir>/summary/timing.{json,md}``, ``summary.json`` and MLflow
    (`echoflow.study.timing`).
    """
    times = StepTimes(Path(cfg.workdir))

    def step(name: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        return once(cfg, name, lambda: times.measure(name, work))

    cohort = times.measure("cohort", lambda: Cohort.of(cfg))
    once(cfg, "cohort", lambda: {"sites": [str(root) for root in cohort.roots]})
    trained = step("models", lambda: train_models(cfg, cohort))
    models = Models.load(cfg)  # each read once, by the first step that needs it
    # embedded once for screening and the audit
    real = functools.cache(lambda: times.measure("embed real frames", lambda: embed_real(cfg, models, cohort)))
    generated = step("generate", lambda: generate(cfg, models, cohort, real()))
    audited = step("audit", lambda: audit(cfg, models, cohort, real()))
    released = Path(cfg.workdir) / "audit" / "released"
    evaluated = step("evaluate", lambda: parity_study(cfg, models, cohort, released, audited["released"]))
    summary = times.measure("summary", lambda: write_summary(
        Path(cfg.workdir), models=trained, generated=generated, audited=audited, evaluated=evaluated,
        released=released, real_roots=cohort.roots))
    summary["timing"] = write_timing(Path(cfg.workdir), times, extra=federated_stage_seconds(trained["history"]))
    mlflow.log_artifacts(str(Path(cfg.workdir) / "summary"), "summary")
    for item in sorted((Path(cfg.workdir) / "audit").iterdir()):
        if item.name == "indexes":  # the sites' FAISS indexes hold real-frame embeddings: they never leave the run
            continue
        if item.is_dir():
            mlflow.log_artifacts(str(item), f"audit/{item.name}")
        else:
            mlflow.log_artifact(str(item), "audit")
    return summary
