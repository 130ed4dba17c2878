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
import torch
from omegaconf import DictConfig, OmegaConf

from echoflow.audit.decide import AuditFailedError
from echoflow.audit.embed import embed
from echoflow.audit.run import AuditSettings, RealSite, decide, embed_sites, run_audit
from echoflow.centralized import (
    cohort_roots,
    encode_sites,
    load_network,
    load_split,
    plain,
    save_network,
    train_stages,
)
from echoflow.data.sites import load_sites
from echoflow.errors import EchoFlowError
from echoflow.evaluation import first_clips, measure_ef
from echoflow.federation.echo_task import global_network
from echoflow.federation.pipeline import federate
from echoflow.generate import animate_frames, decode_clips, sample_latent_frames, to_uint8, write_synthetic
from echoflow.metrics import frechet_distance, regression
from echoflow.models.vae import AdversarialVAE
from echoflow.parity import compare, train_regressors
from echoflow.summary import write_summary

GENERATIVE = ("vae", "image_flow", "reid", "video_flow")
FEDERATED_EF = "federated real"  #: the parity row of the EF regressor the sites federate on their real videos


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


def export_global(cfg: DictConfig, stage: str, round_folder: str) -> None:
    """Write a federated stage's final global ``model`` weights where `load_network` looks."""
    net = global_network(stage, plain(cfg.model), Path(round_folder))
    save_network(net, Path(cfg.workdir) / stage / "model.safetensors")


def train_models(cfg: DictConfig) -> dict[str, Any]:
    """Train the four EchoFlow stages; returns rounds, latent scale and per-site loss history.

    ``pipeline.training=federated`` (default): the sites federate the stages in order — the VAE first (the
    federation pools the sites' latent moments into its latent scale), then the latent stages on the global
    VAE's latents, encoded at each site, then an EF regressor on their real videos (a parity baseline that never
    pools data). ``centralized``: the baseline on the pooled TRAIN split (resuming, or reusing finished, models
    in ``<workdir>/<stage>/``); it has no rounds.
    """
    cfg = scaled_training(cfg)
    if cfg.pipeline.training == "centralized":
        vae = train_stages(cfg, GENERATIVE)["vae"]
        return {"latent_scale": float(cast(AdversarialVAE, vae).latent_scale), "rounds": {}, "history": {}}
    per_stage = {stage: dict(values) for stage, values in cfg.pipeline.federation.items()}
    states = federate(cfg, [*GENERATIVE, "ef"], per_stage=per_stage)
    for stage, state in states.items():
        export_global(cfg, stage, f"{Path(cfg.federation.checkpoint_dir) / stage}/round_{state.round:04d}")
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


def requested_efs(cfg: DictConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """EFs to animate at: drawn from the real TRAIN EF distribution, or uniform over ``pipeline.ef_range``."""
    if cfg.pipeline.ef == "real":
        real = torch.tensor([r.ef for site in load_split(cfg, ["TRAIN"]) for r in site.records])
        return real[torch.randint(len(real), (n,), generator=generator)]
    low, high = cfg.pipeline.ef_range
    return low + (high - low) * torch.rand(n, generator=generator)


def embed_real(cfg: DictConfig) -> dict[str, RealSite]:
    """Every site's real TRAIN and held-out frames in re-id space: what screening and the audit compare with."""
    vae, reid = cast(AdversarialVAE, load_network("vae", cfg)), load_network("reid", cfg)
    return embed_sites(vae, reid, load_split(cfg, ["TRAIN"]), load_split(cfg, ["VAL", "TEST"]), audit_settings(cfg))


def audit_settings(cfg: DictConfig) -> AuditSettings:
    """The ``audit`` config group, typed."""
    return AuditSettings.from_config(cast(dict, plain(cfg.audit)))


def generate(cfg: DictConfig, real: Mapping[str, RealSite]) -> dict[str, Any]:
    """Sample ~``oversample``× the target latent frames, screen them with re-id, animate survivors, decode, write."""
    vae = cast(AdversarialVAE, load_network("vae", cfg))
    reid = load_network("reid", cfg)
    p, s = cfg.pipeline, cfg.train.sampling
    generator = torch.Generator().manual_seed(cfg.seed)
    latent = cfg.data.size // vae.downsample
    drawn = round(p.videos * p.oversample)
    frames = sample_latent_frames(load_network("image_flow", cfg), drawn, shape=(vae.latent_channels, latent, latent),
                                  steps=s.steps, method=s.method, target=cfg.train.image_flow.loss.target,
                                  generator=generator)
    _, screened, _ = decide(real, embed(reid, frames).numpy(), audit_settings(cfg),
                            Path(cfg.workdir) / "audit" / "indexes")
    if screened.failed:
        raise AuditFailedError(f"screening: sites failed: {screened.failures}")
    survivors = frames[torch.from_numpy(screened.release)][: p.videos]
    ef = requested_efs(cfg, len(survivors), generator)
    latents = animate_frames(load_network("video_flow", cfg), survivors, ef, frames=p.frames,
                             window=cfg.data.clip_frames, steps=s.steps, method=s.method,
                             target=cfg.train.video_flow.loss.target, guidance=s.guidance, generator=generator)
    write_synthetic(Path(cfg.workdir) / "generated", to_uint8(decode_clips(vae, latents)), ef.numpy(),
                    fps=cfg.data.clip_fps)
    return {"drawn": drawn, "screened_out": int((~screened.release).sum()), "animated": len(survivors)}


def audit(cfg: DictConfig, real: Mapping[str, RealSite]) -> dict[str, Any]:
    """The full audit of every generated frame against every site; releases what passes."""
    outcome = run_audit(vae=cast(AdversarialVAE, load_network("vae", cfg)), reid=load_network("reid", cfg),
                        train=load_split(cfg, ["TRAIN"]), heldout=load_split(cfg, ["VAL", "TEST"]),
                        generated_dir=Path(cfg.workdir) / "generated", out=Path(cfg.workdir) / "audit",
                        index_dir=Path(cfg.workdir) / "audit" / "indexes",
                        settings=audit_settings(cfg), real=real)
    if outcome.result.failed:
        raise AuditFailedError(f"{outcome.paths[0]}: audit failed, nothing released ({outcome.result.failures})")
    return {"released": len(outcome.released), "videos": len(outcome.decisions), "counts": outcome.report["counts"],
            "report": [str(path) for path in outcome.paths]}


def evaluate(cfg: DictConfig, released_count: int) -> dict[str, Any]:
    """EF regressors on real / synthetic / both (and federated on real); EF consistency and re-id Fréchet distance.

    EF consistency (requested vs measured EF of the released videos) uses the pooled real-trained regressor.
    """
    roots, released = cohort_roots(cfg), Path(cfg.workdir) / "audit" / "released"
    if released_count < 2:
        raise EchoFlowError(f"{released}: {released_count} videos released; too few to train an EF regressor")
    recipe = cfg.copy()
    OmegaConf.update(recipe, "train.ef.optim.steps", cfg.pipeline.ef_steps)
    regressors = train_regressors(recipe, roots, released)
    if cfg.pipeline.training == "federated":
        regressors[FEDERATED_EF] = load_network("ef", cfg)
    results = compare(cfg, regressors, roots)
    synthetic = load_sites([released], size=cfg.data.size)
    clips, requested, _ = first_clips(synthetic, frames=cfg.data.clip_frames, fps=cfg.data.clip_fps)
    measured = measure_ef(regressors["real"], clips)
    consistency = regression(requested.numpy(), measured.numpy())
    vae, reid = cast(AdversarialVAE, load_network("vae", cfg)), load_network("reid", cfg)
    first = [encode_sites(vae, sites) for sites in (synthetic, load_split(cfg, ["TEST"]))]
    gen, real = (embed(reid, torch.stack([torch.from_numpy(v[0]) for s in sites for v in s.videos])).numpy()
                 for sites in first)
    results["consistency"] = {"requested": requested.tolist(), "measured": measured.tolist(),
                              "r2": consistency.r2, "mae": consistency.mae}
    results["frechet_reid"] = frechet_distance(gen, real)
    return results


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """The whole main job under one MLflow parent run (the caller starts it); returns the summary."""
    once(cfg, "cohort", lambda: {"sites": [str(root) for root in cohort_roots(cfg)]})
    models = once(cfg, "models", lambda: train_models(cfg))
    real = functools.cache(lambda: embed_real(cfg))  # embedded once for screening and the audit
    generated = once(cfg, "generate", lambda: generate(cfg, real()))
    audited = once(cfg, "audit", lambda: audit(cfg, real()))
    evaluated = once(cfg, "evaluate", lambda: evaluate(cfg, audited["released"]))
    summary = write_summary(Path(cfg.workdir), models=models, generated=generated, audited=audited,
                            evaluated=evaluated, released=Path(cfg.workdir) / "audit" / "released",
                            real_roots=cohort_roots(cfg))
    mlflow.log_artifacts(str(Path(cfg.workdir) / "summary"), "summary")
    mlflow.log_artifacts(str(Path(cfg.workdir) / "audit"), "audit")
    return summary
