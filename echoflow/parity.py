"""The paper's proof: EF regressors trained on real, on released synthetic, and on both — tested on real.

All regressors share one recipe (``train.ef``) and are tested on every site's held-out real TEST split, per
site and pooled, with bootstrap 95 % intervals. Trained regressors live in ``<workdir>/parity/<source>/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from torch import nn

from echoflow.centralized import train_stage
from echoflow.data.sites import load_sites
from echoflow.evaluation import first_clips, measure_ef
from echoflow.metrics import Regression, regression

SOURCES = ("real", "synthetic", "real+synthetic")
"""What each EF regressor trains on."""


def score(pred: np.ndarray, truth: np.ndarray, site: np.ndarray, names: Sequence[str]) -> dict[str, Regression]:
    """Regression quality pooled and per site."""
    scores = {"pooled": regression(truth, pred)}
    for index, name in enumerate(names):
        mask = site == index
        if mask.sum() >= 2:
            scores[name] = regression(truth[mask], pred[mask])
    return scores


def train_regressors(cfg: DictConfig, real_roots: Sequence[Path], released: Path | None, *,
                     quiet: bool = False) -> dict[str, nn.Module]:
    """EF regressors on each source; ``released`` None (nothing released) trains the real one only."""
    size, out = cfg.data.size, Path(cfg.workdir) / "parity"
    data = {"real": list(real_roots)}
    if released is not None:
        data |= {"synthetic": [released], "real+synthetic": [*real_roots, released]}
    return {source: train_stage("ef", cfg, load_sites(roots, size=size), out=out / source, quiet=quiet)
            for source, roots in data.items()}


def compare(cfg: DictConfig, regressors: dict[str, nn.Module], real_roots: Sequence[Path]) -> dict[str, Any]:
    """Every regressor on the real TEST splits: ``{source: {pooled|site: Regression as dict}}`` + predictions."""
    test = load_sites(real_roots, size=cfg.data.size, splits=["TEST"])
    clips, ef, sites = first_clips(test, frames=cfg.data.clip_frames, fps=cfg.data.clip_fps)
    truth, site = ef.numpy(), sites.numpy()
    names = [s.name for s in test]
    results: dict[str, Any] = {"truth": truth.tolist(), "site": site.tolist(), "sources": {}}
    for source, regressor in regressors.items():
        pred = measure_ef(regressor, clips).numpy()
        results["sources"][source] = {"prediction": pred.tolist(),
                                      "scores": {k: asdict(v) for k, v in score(pred, truth, site, names).items()}}
    return results
