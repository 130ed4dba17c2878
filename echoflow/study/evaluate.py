"""What the trained models are worth, measured on held-out real data, and the paper's proof: EF-regression parity.

Metrics: EF regression errors with bootstrap intervals; the Fréchet distance of embeddings.

Held-out measurements of the models (``echoflow evaluate models``):
- EF regressor: MAE/RMSE/R² on held-out real clips.
- VAE keeps what matters: EF measured on VAE-reconstructed clips vs on the originals.
- Re-id generalises: same- vs different-patient verification AUC on patients never seen in training.
- Image flow: Fréchet distance, in re-id embedding space, of sampled latents to held-out real latents, next to
  the real-vs-real floor and a trivial baseline (Gaussian latents).
- Video flow obeys EF: clips generated at requested EFs, decoded, measured by the real-trained regressor.

Parity: EF regressors trained on real, on released synthetic, and on both share one recipe (``train.ef``) and
are tested on held-out real videos (`Cohort.test`: the test cohort of unseen patients, ``data.test_patients`` per
site, else every site's TEST split), per site and pooled. ``pipeline.ef_seeds`` regressors per source
(seed ``seed + k``): seed 0 in ``<workdir>/parity/<source>/``, seed k in ``<workdir>/parity/<source>.seed<k>/``.
One seed: bootstrap 95 % intervals over test videos; several: mean and Student-t 95 % interval over seeds.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from scipy import linalg
from torch import Tensor, nn

from echoflow.audit.embed import embed
from echoflow.config import limit_threads, plain, threads_of
from echoflow.data.sites import ClipDataset, SiteData
from echoflow.errors import EchoFlowError
from echoflow.models.flow import Method, Target
from echoflow.models.image_flow import conditions_on_ef
from echoflow.models.reid import verification_auc
from echoflow.models.vae import AdversarialVAE
from echoflow.progress import progress_bar
from echoflow.stages.data import encode_sites
from echoflow.stages.networks import load_network
from echoflow.study.centralized import train_stage
from echoflow.study.generate import animate_frames, decode_clips, sample_latent_frames
from echoflow.study.models import Cohort, Models, trained_network
from echoflow.study.protocol import seed_interval, seed_maes
from echoflow.tracking import log_metrics


@dataclass(frozen=True)
class Regression:
    """EF regression quality on one test set (EF in percent).

    Attributes:
        mae, rmse: EF points. r2: coefficient of determination. n: number of videos.
        mae_ci, rmse_ci, r2_ci: bootstrap 95 % intervals (low, high).
    """

    mae: float
    rmse: float
    r2: float
    n: int
    mae_ci: tuple[float, float]
    rmse_ci: tuple[float, float]
    r2_ci: tuple[float, float]


def _errors(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    residual = pred - truth
    total = float(np.sum((truth - truth.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / total if total > 0 else float("nan")
    return float(np.mean(np.abs(residual))), float(np.sqrt(np.mean(residual**2))), r2


def regression(truth: np.ndarray, pred: np.ndarray, *, bootstrap: int = 1000, seed: int = 0) -> Regression:
    """MAE, RMSE and R² of ``pred`` against ``truth`` (both (N,) EF percent) with percentile-bootstrap 95 % CIs."""
    truth, pred = np.asarray(truth, np.float64), np.asarray(pred, np.float64)
    if truth.shape != pred.shape or truth.ndim != 1 or len(truth) < 2:
        raise EchoFlowError(f"metrics: need two equal (N>=2,) arrays, got {truth.shape} and {pred.shape}")
    rng = np.random.default_rng(seed)
    draws = np.array([_errors(truth[i], pred[i]) for i in rng.integers(0, len(truth), (bootstrap, len(truth)))])
    low, high = np.nanpercentile(draws, 2.5, axis=0), np.nanpercentile(draws, 97.5, axis=0)
    mae, rmse, r2 = _errors(truth, pred)
    return Regression(mae, rmse, r2, len(truth), (low[0], high[0]), (low[1], high[1]), (low[2], high[2]))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to embeddings ``a`` (N, D) and ``b`` (M, D) (as FID does)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise EchoFlowError(f"metrics: need (N, D) and (M, D) embeddings, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.real(linalg.sqrtm(cov_a @ cov_b))  # tiny imaginary parts are numerical noise
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * root))


def first_clips(sites: Sequence[SiteData], *, frames: int, fps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Every video's first clip (N, C, T, H, W), its EF (N,) percent and its site index (N,)."""
    dataset = ClipDataset(sites, frames=frames, fps=fps, random_start=False)
    items = [dataset[i] for i in range(len(dataset))]
    return tuple(torch.stack([item[key] for item in items]) for key in ("clip", "ef", "site"))  # type: ignore[return-value]


@torch.no_grad()
def measure_ef(regressor: nn.Module, clips: Tensor, *, batch_size: int = 32) -> Tensor:
    """EF (N,) percent that ``regressor`` reads from pixel clips (N, 1, T, H, W)."""
    regressor.eval()
    return torch.cat([regressor(chunk) for chunk in clips.split(batch_size)])


def ef_regression(regressor: nn.Module, sites: Sequence[SiteData], *, frames: int, fps: float) -> Regression:
    """The regressor on real held-out clips."""
    clips, ef, _ = first_clips(sites, frames=frames, fps=fps)
    return regression(ef.numpy(), measure_ef(regressor, clips).numpy())


@torch.no_grad()
def vae_ef_gap(vae: AdversarialVAE, regressor: nn.Module, sites: Sequence[SiteData], *, frames: int,
               fps: float) -> dict[str, float]:
    """EF MAE on original clips vs on their VAE reconstructions (and the reconstructions' pixel L1)."""
    clips, ef, _ = first_clips(sites, frames=frames, fps=fps)
    return ef_gap(regressor, clips, reconstruct(vae, clips), ef)


@torch.no_grad()
def reconstruct(vae: AdversarialVAE, clips: Tensor, *, batch_size: int = 8) -> Tensor:
    """VAE reconstructions (N, 1, T, H, W) in [-1, 1] of pixel clips of the same shape."""
    vae.eval()
    return torch.cat([vae.decode_latent(vae.encode_latent(c)).clamp(-1, 1) for c in clips.split(batch_size)])


def ef_gap(regressor: nn.Module, clips: Tensor, recon: Tensor, ef: Tensor) -> dict[str, float]:
    """EF MAE (points) on ``clips`` vs on their reconstructions ``recon``, against true ``ef`` (N,) percent."""
    on_real, on_recon = measure_ef(regressor, clips), measure_ef(regressor, recon)
    return {
        "mae_original": float((on_real - ef).abs().mean()),
        "mae_reconstructed": float((on_recon - ef).abs().mean()),
        "mae_between": float((on_recon - on_real).abs().mean()),
        "pixel_l1": float((recon - clips).abs().mean()),
    }


def frames_of(latent_sites: Sequence[SiteData], *, every: int) -> tuple[Tensor, Tensor]:
    """Every ``every``-th latent frame of every video (N, C, h, w) and its patient index (N,)."""
    frames, patients = [], []
    for site in latent_sites:
        for record, video in zip(site.records, site.videos, strict=True):
            picked = torch.from_numpy(video[::every])
            frames.append(picked)
            patients += [site.patient_index[record.patient_id]] * len(picked)
    return torch.cat(frames), torch.tensor(patients)


def reid_auc(encoder: nn.Module, latent_sites: Sequence[SiteData], *, every: int = 8) -> float:
    """Same- vs different-patient verification AUC on the given (held-out) sites' latent frames."""
    frames, patients = frames_of(latent_sites, every=every)
    return verification_auc(embed(encoder, frames), patients)


def image_flow_fd(flow: nn.Module, encoder: nn.Module, train: Sequence[SiteData], held_out: Sequence[SiteData],
                  *, n: int, steps: int, method: Method, target: Target) -> dict[str, float]:
    """Fréchet distance to held-out real latents in re-id space: generated, real-train floor, Gaussian baseline."""
    real, _ = frames_of(held_out, every=4)
    floor, _ = frames_of(train, every=4)
    ef = None
    if conditions_on_ef(flow):  # drawn for EFs as the held-out videos have
        efs = torch.tensor([record.ef for site in held_out for record in site.records], dtype=torch.float32)
        ef = efs[torch.randint(len(efs), (n,))]
    generated = sample_latent_frames(flow, n, shape=real.shape[1:], steps=steps, method=method, target=target,
                                     ef=ef)
    reference = embed(encoder, real).numpy()
    fd = {
        "generated": frechet_distance(embed(encoder, generated).numpy(), reference),
        "real_floor": frechet_distance(embed(encoder, floor[torch.randperm(len(floor))[:n]]).numpy(), reference),
        "gaussian_baseline": frechet_distance(embed(encoder, torch.randn(n, *real.shape[1:])).numpy(), reference),
    }
    fd["baseline_over_generated"] = fd["gaussian_baseline"] / max(fd["generated"], 1e-12)
    return fd


def video_flow_ef(video_flow: nn.Module, vae: AdversarialVAE, regressor: nn.Module,
                  held_out: Sequence[SiteData], *, n: int, frames: int, steps: int, method: Method, target: Target,
                  guidance: float, ef_range: tuple[float, float] = (20.0, 75.0), seed: int = 0
                  ) -> tuple[Regression, np.ndarray, np.ndarray]:
    """Animate held-out first latent frames at requested EFs; R² of regressor-measured EF vs requested.

    Returns the regression summary and the (requested, measured) EF arrays for plotting.
    """
    generator = torch.Generator().manual_seed(seed)
    firsts = torch.stack([torch.from_numpy(video[0]) for site in held_out for video in site.videos])
    firsts = firsts[torch.randint(len(firsts), (n,), generator=generator)]
    requested = ef_range[0] + (ef_range[1] - ef_range[0]) * torch.rand(n, generator=generator)
    latents = animate_frames(video_flow, firsts, requested, frames=frames, window=frames, steps=steps,
                             method=method, target=target, guidance=guidance, generator=generator)
    measured = measure_ef(regressor, decode_clips(vae, latents))
    return regression(requested.numpy(), measured.numpy()), requested.numpy(), measured.numpy()


SOURCES = ("real", "synthetic", "real+synthetic")
"""What each EF regressor trains on."""


def scored_sets(site: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Masks of the videos scored: ``pooled`` (all), then each site with at least two TEST videos."""
    masks = {"pooled": np.ones(len(site), dtype=bool)}
    return masks | {name: site == i for i, name in enumerate(names) if (site == i).sum() >= 2}


def score(pred: np.ndarray, truth: np.ndarray, site: np.ndarray, names: Sequence[str]) -> dict[str, Regression]:
    """Regression quality pooled and per site (`scored_sets`)."""
    return {test_set: regression(truth[mask], pred[mask]) for test_set, mask in scored_sets(site, names).items()}


def seed_folder(root: Path, source: str, k: int) -> Path:
    """Where seed ``k`` of ``source``'s regressor lives.

    ``root/<source>`` for seed 0 (the one-seed layout, unchanged), ``root/<source>.seed<k>`` for the others.
    """
    return root / source if k == 0 else root / f"{source}.seed{k}"


def regressor_workers(jobs: int, threads: int) -> int:
    """Worker processes for ``jobs`` regressors of ``threads`` threads each.

    One-thread regressors: a process each up to one more than the cores (on 2 cores a pool of 2 ran the third
    of three alone); several threads: the cores / threads cap.
    """
    cores = os.cpu_count() or 1
    return min(jobs, cores + 1 if threads == 1 else max(1, cores // threads))


def train_seeded(cfg: DictConfig, data: Mapping[str, list[SiteData]], root: Path, seeds: Sequence[int], *,
                 log_as: str = "parity") -> dict[str, list[nn.Module]]:
    """An EF regressor per (source, seed offset ``k``), ``seed = cfg.seed + k``, each in its `seed_folder`.

    Returns per source its regressors in ``seeds`` order. The regressors train side by side in one pool of
    forked processes (no re-import; `regressor_workers`), each seeded as if alone, so the weights are those of
    training them one after another: seed 0 is the one-seed run's regressor. Each one's loss curve goes to
    MLflow as ``<log_as>/<source>[.seed<k>]/<metric>`` (``+`` spelt ``_plus_``); a finished one is read back.
    """
    jobs = [(cfg if k == 0 else cast(DictConfig, OmegaConf.merge(cfg, {"seed": int(cfg.seed) + k})), sites,
             seed_folder(root, source, k)) for source, sites in data.items() for k in seeds]
    names = [seed_folder(Path(), source, k).name for source in data for k in seeds]
    label = ", ".join(data) + (f"; {len(seeds)} seeds each" if len(seeds) > 1 else "")
    with ProcessPoolExecutor(regressor_workers(len(jobs), threads_of(cfg)),
                             mp_context=multiprocessing.get_context("fork")) as pool:
        done = pool.map(train_regressor, jobs)  # forks the workers before the progress display starts its thread
        with progress_bar(f"train EF regressors ({label})", total=len(jobs)) as advance:
            for name, curve in zip(names, done, strict=True):
                log = log_metrics(f"{log_as}/{name.replace('+', '_plus_')}")  # MLflow names: no "+"
                for step, values in curve:
                    log(step, values)
                advance(1)
    return {source: [load_network("ef", plain(cfg.model), seed_folder(root, source, k) / "model.safetensors")
                     for k in seeds] for source in data}


def train_regressors(cfg: DictConfig, cohort: Cohort, released: Path | None) -> dict[str, list[nn.Module]]:
    """EF regressors on each source, ``pipeline.ef_seeds`` seeds each (`train_seeded`, in ``<workdir>/parity``).

    ``released`` None (nothing released) trains the real one only.
    """
    data = {"real": list(cohort.roots)}
    if released is not None:
        data |= {"synthetic": [released], "real+synthetic": [*cohort.roots, released]}
    sites = {source: cohort.sites(roots, "TRAIN") for source, roots in data.items()}  # decoded here, once
    seeds = int(cfg.pipeline.ef_seeds)
    if seeds < 1:
        raise EchoFlowError(f"pipeline.ef_seeds: {seeds}; need at least one EF regressor seed per arm")
    return train_seeded(cfg, sites, Path(cfg.workdir) / "parity", range(seeds))


def train_regressor(job: tuple[DictConfig, list[SiteData], Path]) -> list[tuple[int, dict[str, float]]]:
    """One regressor ``(cfg, TRAIN sites, out folder)``, in a worker process; returns its logged (step, metrics)."""
    cfg, sites, out = job
    limit_threads(threads_of(cfg))
    curve: list[tuple[int, dict[str, float]]] = []
    train_stage("ef", cfg, sites, out=out, quiet=True, on_metrics=lambda step, values: curve.append((step, values)))
    return curve


def seed_predictions(regressors: Sequence[nn.Module], clips: Tensor) -> np.ndarray:
    """EF (seeds, N) percent that each seed's regressor reads from the clips."""
    return np.stack([measure_ef(regressor, clips).numpy() for regressor in regressors])


def score_seeds(pred: np.ndarray, truth: np.ndarray, site: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Regression quality pooled and per site of one arm's seeds, predictions ``pred`` (seeds, N).

    One seed: `score` (bootstrap intervals over videos). Several: per test set the mean over seeds of MAE, RMSE
    and R², each with its Student-t 95 % interval over seeds (`seed_interval`, as ``*_ci``), ``seeds`` and
    ``mae_per_seed`` (`seed_maes`).
    """
    if len(pred) == 1:
        return {k: asdict(v) for k, v in score(pred[0], truth, site, names).items()}
    scores = {}
    for test_set, mask in scored_sets(site, names).items():
        maes = seed_maes(pred[:, mask] - truth[mask])
        _, rmse, r2 = np.array([_errors(truth[mask], p[mask]) for p in pred]).T
        scores[test_set] = {"mae": maes.mean, "mae_ci": (maes.mean - maes.half, maes.mean + maes.half)}
        for key, values in (("rmse", rmse), ("r2", r2)):
            mean, half = seed_interval(values.tolist())
            scores[test_set] |= {key: mean, f"{key}_ci": (mean - half, mean + half)}
        scores[test_set] |= {"n": int(mask.sum()), "seeds": len(pred), "mae_per_seed": list(maes.per_seed)}
    return scores


def score_regressors(cfg: DictConfig, regressors: Mapping[str, Sequence[nn.Module]], cohort: Cohort
                     ) -> dict[str, Any]:
    """Every source's regressors (one per seed) on the real test videos (`Cohort.test`), with truth and site per video.

    Per source: ``scores`` (`score_seeds`, pooled and per site), ``prediction`` (seed 0's) and, for several
    seeds only, ``predictions`` (every seed's).
    """
    test = cohort.test()
    clips, ef, sites = first_clips(test, frames=cfg.data.clip_frames, fps=cfg.data.clip_fps)
    truth, site = ef.numpy(), sites.numpy()
    names = [s.name for s in test]
    results: dict[str, Any] = {"truth": truth.tolist(), "site": site.tolist(), "sources": {}}
    for source, seeded in regressors.items():
        pred = seed_predictions(seeded, clips)
        results["sources"][source] = {"prediction": pred[0].tolist(), "scores": score_seeds(pred, truth, site, names)}
        if len(pred) > 1:
            results["sources"][source]["predictions"] = pred.tolist()
    return results


FEDERATED_EF = "federated real"
"""The parity row of the EF regressor the sites federate on their real videos."""


def parity_study(cfg: DictConfig, models: Models, cohort: Cohort, released: Path, released_count: int
                 ) -> dict[str, Any]:
    """EF regressors on real / synthetic / both (and federated on real); EF consistency and re-id Fréchet distance.

    EF consistency (requested vs measured EF of the released videos) uses the pooled real-trained regressor (seed 0).
    """
    if released_count < 2:
        raise EchoFlowError(f"{released}: {released_count} videos released; too few to train an EF regressor")
    recipe = cfg.copy()
    OmegaConf.update(recipe, "train.ef.optim.steps", cfg.pipeline.ef_steps)
    regressors = train_regressors(recipe, cohort, released)
    if cfg.pipeline.training == "federated":  # one regressor: the federated stage's
        regressors[FEDERATED_EF] = [trained_network(cfg, "ef")]
    results = score_regressors(cfg, regressors, cohort)
    synthetic = cohort.sites([released], "TRAIN")
    clips, requested, _ = first_clips(synthetic, frames=cfg.data.clip_frames, fps=cfg.data.clip_fps)
    measured = measure_ef(regressors["real"][0], clips)
    consistency = regression(requested.numpy(), measured.numpy())
    first = [encode_sites(models.vae, sites) for sites in (synthetic, cohort.test())]
    gen, real = (embed(models.reid, torch.stack([torch.from_numpy(v[0]) for s in sites for v in s.videos])).numpy()
                 for sites in first)
    results["consistency"] = {"requested": requested.tolist(), "measured": measured.tolist(),
                              "r2": consistency.r2, "mae": consistency.mae}
    results["frechet_reid"] = frechet_distance(gen, real)
    return results


def evaluate_models(cfg: DictConfig, models: Models, cohort: Cohort, *, samples: int, fd_samples: int
                    ) -> dict[str, Any]:
    """Every trained stage measured on the VAL+TEST patients (never seen in training); see the module docstring."""
    clip = {"frames": cfg.data.clip_frames, "fps": cfg.data.clip_fps}
    sampling = {"steps": cfg.train.sampling.steps, "method": cfg.train.sampling.method}
    ef_model = trained_network(cfg, "ef")
    held_out, train = cohort.split("VAL", "TEST"), cohort.split("TRAIN")
    latent_held_out, latent_train = encode_sites(models.vae, held_out), encode_sites(models.vae, train)
    regressor = ef_regression(ef_model, held_out, **clip)
    video, _, _ = video_flow_ef(models.video_flow, models.vae, ef_model, latent_held_out, n=samples,
                                frames=cfg.data.clip_frames, target=cfg.train.video_flow.loss.target,
                                guidance=cfg.train.sampling.guidance, **sampling)
    results: dict[str, Any] = {
        "ef_regressor": {"mae": regressor.mae, "rmse": regressor.rmse, "r2": regressor.r2, "n": regressor.n},
        "vae_ef": vae_ef_gap(models.vae, ef_model, held_out, **clip),
        "reid_auc_unseen_patients": reid_auc(models.reid, latent_held_out),
        "image_flow_fd": image_flow_fd(models.image_flow, models.reid, latent_train, latent_held_out, n=fd_samples,
                                       target=cfg.train.image_flow.loss.target, **sampling),
        "video_flow_ef": {"r2": video.r2, "mae": video.mae, "n": video.n},
    }
    results["vae_ef"]["mae_gap"] = results["vae_ef"]["mae_reconstructed"] - results["vae_ef"]["mae_original"]
    return results
