"""Parity over regressor seeds: seed k trains with seed + k in its own folder (seed 0 the one-seed layout), and the
summary's per-seed MAEs, t interval and seed-averaged paired ratio are `seed_interval` / `paired_mae_ratio`'s."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from echoflow.cli.pipeline import parity_table
from echoflow.config import load_config
from echoflow.data.phantom import generate_cohort
from echoflow.data.sites import load_sites
from echoflow.errors import EchoFlowError
from echoflow.study.centralized import train_stage
from echoflow.study.evaluate import score_seeds, seed_folder, train_seeded
from echoflow.study.protocol import paired_mae_ratio, seed_averaged_ratio, seed_interval, seed_maes
from echoflow.study.summary import parity_rows, write_summary


def test_seed_zero_is_the_one_seed_regressor_and_other_seeds_differ(tmp_path: Path) -> None:
    roots = generate_cohort(tmp_path / "cohort", sites=1, patients_per_site=3, seed=0, size=32, frames=32)
    cfg = load_config(["data.size=32", "model.ef.channels=[4,8,8,8]", "train.ef.optim.steps=2",
                       "train.ef.optim.batch_size=2", "threads=1", f"workdir={tmp_path}"])
    sites = load_sites(roots, size=32)
    root = tmp_path / "parity"
    assert seed_folder(root, "real", 0) == root / "real"  # where the one-seed pipeline always put it
    assert len({seed_folder(root, s, k) for s in ("real", "real+synthetic") for k in range(3)}) == 6
    trained = train_seeded(cfg, {"real": sites}, root, range(2))["real"]
    legacy = train_stage("ef", cfg, sites, out=tmp_path / "alone", quiet=True)  # seed = cfg.seed, trained alone
    assert (root / "real" / "model.safetensors").is_file() and (root / "real.seed1" / "model.safetensors").is_file()
    for key, value in legacy.state_dict().items():
        assert torch.equal(trained[0].state_dict()[key], value), key
    differ = [key for key, value in trained[1].state_dict().items() if value.is_floating_point()
              and not torch.equal(value, trained[0].state_dict()[key])]
    assert differ  # seed 1 started from other weights (seed + 1)


def seeded_results(rng: np.random.Generator, seeds: int) -> dict:
    """Two arms' predictions over ``seeds`` seeds on 40 videos of 2 sites, scored as `score_regressors` does."""
    truth = rng.uniform(20, 75, 40)
    site = np.arange(40) % 2
    sources = {}
    for source, noise in (("real", 3.0), ("synthetic", 8.0)):
        pred = truth + rng.normal(0, noise, (seeds, 40)) + rng.normal(0, noise, (seeds, 1))  # seeds differ
        sources[source] = {"prediction": pred[0].tolist(), "predictions": pred.tolist(),
                           "scores": score_seeds(pred, truth, site, ["site_00", "site_01"])}
    return {"truth": truth.tolist(), "site": site.tolist(), "sources": sources, "frechet_reid": 0.4,
            "consistency": {"requested": [30.0, 60.0], "measured": [35.0, 55.0], "r2": 0.5, "mae": 5.0}}


def test_scores_over_seeds_are_the_seed_interval_of_each_seeds_mae() -> None:
    evaluated = seeded_results(np.random.default_rng(0), seeds=4)
    truth, site = np.array(evaluated["truth"]), np.array(evaluated["site"])
    for result in evaluated["sources"].values():
        pred = np.array(result["predictions"])
        per_seed = np.abs(pred - truth).mean(1)
        mean, half = seed_interval(per_seed.tolist())
        pooled = result["scores"]["pooled"]
        assert pooled["seeds"] == 4 and pooled["mae_per_seed"] == pytest.approx(per_seed)
        assert (pooled["mae"], *pooled["mae_ci"]) == pytest.approx((mean, mean - half, mean + half))
        assert half > 0 and len(set(pooled["mae_per_seed"])) == 4
        first = result["scores"]["site_01"]["mae_per_seed"]
        assert first == pytest.approx(np.abs(pred[:, site == 1] - truth[site == 1]).mean(1))
    real = np.array(evaluated["sources"]["real"]["predictions"][:1])  # one seed: bootstrap over videos, as before
    one = score_seeds(real, truth, site, ["site_00", "site_01"])
    assert "seeds" not in one["pooled"] and one["pooled"]["mae"] == pytest.approx(np.abs(real[0] - truth).mean())
    with pytest.raises(EchoFlowError, match="seeds, videos"):
        seed_maes(np.ones(3))


def test_summary_ratio_is_the_paired_ratio_of_seed_averaged_errors(tmp_path: Path) -> None:
    evaluated = seeded_results(np.random.default_rng(1), seeds=5)
    truth = np.array(evaluated["truth"])
    errors = {s: np.abs(np.array(evaluated["sources"][s]["predictions"]) - truth) for s in ("synthetic", "real")}
    expected = paired_mae_ratio(errors["synthetic"].mean(0), errors["real"].mean(0))
    assert seed_averaged_ratio(errors["synthetic"], errors["real"]) == expected
    seed0 = paired_mae_ratio(errors["synthetic"][0], errors["real"][0])
    assert (seed0.low, seed0.high) != (expected.low, expected.high)  # a summary of seed 0 alone would differ
    summary = write_summary(tmp_path, models={"history": {}, "rounds": {}, "latent_scale": 1.0},
                            generated={"drawn": 8, "screened_out": 0, "animated": 8},
                            audited={"released": 8, "videos": 8}, evaluated=evaluated)
    headline = summary["headline"]
    assert headline["its 95 % CI (paired bootstrap over real test videos)"] == \
        f"[{expected.low:.2f}, {expected.high:.2f}]"
    assert headline["synthetic-only MAE / real-trained MAE"] == round(expected.ratio, 2)
    assert headline["EF regressor seeds per arm"].startswith("5 ")
    real = seed_maes(errors["real"])
    assert headline["real MAE per seed"] == ", ".join(f"{m:.2f}" for m in real.per_seed)
    markdown = (tmp_path / "summary" / "summary.md").read_text()
    assert f"| real | pooled | {real.mean:.2f} ± {real.half:.2f} |" in markdown and "MAE per seed" in markdown
    assert "MAE per seed" in (tmp_path / "summary" / "summary.html").read_text()
    assert json.loads((tmp_path / "summary" / "summary.json").read_text())["parity"][0]["seeds"] == 5


def test_printed_table_shows_seeds_only_when_there_are_several() -> None:
    console = Console(width=200, record=True)
    one = seeded_results(np.random.default_rng(2), seeds=1)
    for result in one["sources"].values():
        del result["predictions"]
    console.print(parity_table(parity_rows(one)))
    single = console.export_text()
    assert "MAE per seed" not in single and "±" not in single
    assert f"{one['sources']['real']['scores']['pooled']['mae']:.2f}" in single
    console.print(parity_table(parity_rows(seeded_results(np.random.default_rng(2), seeds=3))))
    several = console.export_text()
    assert "MAE per seed" in several and several.count("±") == 2  # real and synthetic, pooled
