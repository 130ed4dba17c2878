"""The parity regressors over seeds: how much of the synthetic-real gap is the recipe, the VAE, or the video flow?

On a finished demo (or parity) workdir, trains the pipeline's EF regressor recipe (``train.ef`` with
``pipeline.ef_steps`` steps, ``model.ef``) once per seed on each arm and tests every regressor on the parity test
videos (`Cohort.test`: the held-out test cohort, else the sites' TEST splits; first clip of each video), through
the pipeline's own seed loop and aggregation (`echoflow.study.evaluate.train_seeded`,
`echoflow.study.protocol.seed_maes` / `seed_averaged_ratio`; the pipeline does the same for its arms with
``pipeline.ef_seeds``). This script adds the ``reconstructed`` arm and seed subsets:

- ``real``: the sites' real TRAIN videos (the pipeline's ``real`` row);
- ``synthetic``: the released videos (``<workdir>/audit/released``; the ``synthetic`` row);
- ``reconstructed``: the VAE's reconstructions of the real TRAIN videos with their true EFs — what a perfect video
  flow could give at best through this VAE (the texture gap alone).

Prints each arm's MAE per seed and its mean with a t 95 % interval over seeds, its calibration (readings against the
true EF: slope, and mean error by true-EF bin), then every other arm's ratio to
``real`` from the seed-averaged per-video errors with a paired-bootstrap 95 % interval over test videos, as
``RESULT`` lines. Seed ``k`` trains with ``seed + k`` (forked, one thread each, the pipeline's pool) under
``<workdir>/regressor_seeds/<tag>/<arm>[.seed<k>]/``; a finished one is read back. Config overrides follow the
options:

    python benchmarks/regressor_seeds.py runs/demo --seeds 0 1 2 3 --tag plain model.ef.input_blur=0
    python benchmarks/regressor_seeds.py runs/demo --seeds 0 1 2 3 --tag blur

With ``--readers-on <released>`` (a fresh released set no regressor trained on, e.g. another draw of the same models
by `benchmarks/regenerate.py` with ``seed=7``): each arm's reading line (slope, intercept, residual SD) against the
requested EFs of that set and against the true EFs of the sites' real VAL videos — a regressor that reads its own
domain on a steeper line than the other shows a domain gap, not label noise — and each arm's test MAE after
regression calibration on its own held-out source (real: VAL; synthetic: that set; a reading r becomes
(r - intercept) / slope, the brain-age bias correction).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from echoflow.cli.pipeline import with_pipeline
from echoflow.config import limit_threads, load_config
from echoflow.data.intensity import to_uint8, to_unit
from echoflow.data.sites import SiteData
from echoflow.study.evaluate import first_clips, reconstruct, seed_predictions, train_seeded
from echoflow.study.models import Cohort, Models
from echoflow.study.protocol import seed_averaged_ratio, seed_maes

ARMS = ("real", "synthetic", "reconstructed")


def arm_sites(cfg: DictConfig, cohort: Cohort, arm: str) -> list[SiteData]:
    """The TRAIN videos an arm's regressor learns from (see the module docstring)."""
    if arm == "real":
        return cohort.split("TRAIN")
    if arm == "synthetic":
        return cohort.sites([Path(cfg.workdir) / "audit" / "released"], "TRAIN")
    vae = Models.load(cfg).vae
    with torch.no_grad():
        return [replace(site, videos=[to_uint8(reconstruct(vae, to_unit(v)[None, None])[0, 0]) for v in site.videos])
                for site in cohort.split("TRAIN")]


def calibration(truth: np.ndarray, error: np.ndarray) -> str:
    """Slope and intercept of the seed-averaged readings against the true EF, and the mean error by true-EF bin.

    A slope under 1 is regression dilution: trained on videos whose motion strays from their labels, a regressor
    pulls its readings toward the labels' mean.
    """
    slope, intercept, _ = reading_line(truth, truth + error)
    edges = (0, 30, 45, 60, 101)
    bias = [f"{lo}-{hi}: {error[(truth >= lo) & (truth < hi)].mean():+.1f}" for lo, hi in pairwise(edges)]
    return f"slope {slope:.2f}, intercept {intercept:.1f}; mean error by true EF {', '.join(bias)}"


def reading_line(truth: np.ndarray, readings: np.ndarray) -> tuple[float, float, float]:
    """Slope, intercept and residual SD of ``readings`` regressed on ``truth``."""
    slope, intercept = np.polyfit(truth, readings, 1)
    return float(slope), float(intercept), float(np.std(readings - intercept - slope * truth))


def readers(arm: str, regressors: Sequence[nn.Module], held_out: dict[str, tuple[torch.Tensor, np.ndarray]],
            on_test: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Print the seed-mean reading lines of ``arm`` on each held-out source; return its calibrated test errors.

    ``on_test`` (seeds, N): each seed's test readings, calibrated by its own line on the arm's source (real:
    ``"real VAL"``); ``truth`` (N,) the test EFs.
    """
    readings = {source: seed_predictions(regressors, clips) for source, (clips, _) in held_out.items()}
    for source, (_, ef) in held_out.items():
        line = reading_line(ef, readings[source].mean(0))
        print(f"RESULT {arm}-trained readers on {source} ({len(ef)}): slope {line[0]:.2f}, intercept {line[1]:.1f}, "
              f"residual SD {line[2]:.1f}")
    own = "real VAL" if arm == "real" else "held-out synthetic"
    lines = [reading_line(held_out[own][1], reading) for reading in readings[own]]
    return np.stack([(r - b) / a for r, (a, b, _) in zip(on_test, lines, strict=True)]) - truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="seed offsets k (seed + k)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--tag", default="default", help="subfolder of <workdir>/regressor_seeds for these runs")
    parser.add_argument("--readers-on", type=Path, help="a fresh released set: reading lines and calibrated MAEs")
    args, overrides = parser.parse_known_args()
    limit_threads(1)
    cfg = load_config(with_pipeline([f"workdir={args.workdir}", *overrides]))
    OmegaConf.update(cfg, "train.ef.optim.steps", cfg.pipeline.ef_steps)
    cohort = Cohort.of(cfg)
    out = args.workdir / "regressor_seeds" / args.tag
    data = {arm: arm_sites(cfg, cohort, arm) for arm in args.arms}
    regressors = train_seeded(cfg, data, out, args.seeds, log_as="regressor_seeds")  # one thread each: cfg.threads
    clips, truth, _ = first_clips(cohort.test(), frames=cfg.data.clip_frames, fps=cfg.data.clip_fps)
    errors: dict[str, np.ndarray] = {}  # arm -> (seeds, videos) signed errors
    for arm in args.arms:
        errors[arm] = seed_predictions(regressors[arm], clips) - truth.numpy()
        maes = seed_maes(errors[arm])
        print(f"{arm}: MAE per seed {', '.join(f'{m:.2f}' for m in maes.per_seed)}")
        print(f"RESULT parity regressor MAE, {arm} ({args.tag}): {maes.mean:.2f} ± {maes.half:.2f} "
              f"(EF points; mean ± t 95 % over {len(maes.per_seed)} seeds, {clips.shape[0]} real test videos)")
        print(f"RESULT calibration, {arm} ({args.tag}): {calibration(truth.numpy(), errors[arm].mean(0))}")
    ratios(errors, args.tag)
    if args.readers_on is not None:
        kept = {"frames": cfg.data.clip_frames, "fps": cfg.data.clip_fps}
        synthetic, requested, _ = first_clips(cohort.sites([args.readers_on], "TRAIN"), **kept)
        val, val_ef, _ = first_clips(cohort.split("VAL"), **kept)
        held_out = {"held-out synthetic": (synthetic, requested.numpy()), "real VAL": (val, val_ef.numpy())}
        calibrated = {arm: readers(arm, regressors[arm], held_out, errors[arm] + truth.numpy(), truth.numpy())
                      for arm in args.arms if arm in ("real", "synthetic")}
        for arm, error in calibrated.items():
            maes = seed_maes(error)
            print(f"RESULT calibrated MAE, {arm} ({args.tag}): {maes.mean:.2f} ± {maes.half:.2f} (per seed "
                  f"{', '.join(f'{m:.2f}' for m in maes.per_seed)})")
        ratios(calibrated, f"{args.tag}, each arm calibrated on its own held-out source")


def ratios(errors: dict[str, np.ndarray], tag: str) -> None:
    """Print each arm's MAE ratio to ``real`` (seed-averaged per-video errors, paired bootstrap)."""
    for arm in errors:
        if arm != "real" and "real" in errors:
            ratio = seed_averaged_ratio(errors[arm], errors["real"])
            print(f"RESULT MAE ratio {arm} / real ({tag}): {ratio.ratio:.2f} (paired-bootstrap 95 % "
                  f"{ratio.low:.2f}-{ratio.high:.2f}; per-video errors averaged over seeds)")


if __name__ == "__main__":
    main()
