from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from echoflow.browser import find_chromium, render
from echoflow.metrics import regression
from echoflow.summary import write_summary


def fake_results(rng: np.random.Generator) -> dict:
    truth = rng.uniform(20, 75, 12)
    site = np.arange(12) % 2
    sources = {}
    for source, noise in (("real", 3), ("synthetic", 9), ("real+synthetic", 4)):
        pred = truth + rng.normal(0, noise, 12)
        scores = {"pooled": asdict(regression(truth, pred))}
        scores |= {f"site_0{s}": asdict(regression(truth[site == s], pred[site == s])) for s in (0, 1)}
        sources[source] = {"prediction": pred.tolist(), "scores": scores}
    requested = rng.uniform(20, 75, 8)
    return {"truth": truth.tolist(), "site": site.tolist(), "sources": sources, "frechet_reid": 0.4,
            "consistency": {"requested": requested.tolist(), "measured": (requested + 5).tolist(), "r2": 0.9,
                            "mae": 5.0}}


def test_summary_files_and_ratio(tmp_path: Path) -> None:
    evaluated = fake_results(np.random.default_rng(0))
    history = {"vae": [{"round": r, "sites": {"0": {"train-loss": 1.0 / r}, "1": {"train-loss": 1.2 / r}}}
                       for r in (1, 2)]}
    summary = write_summary(tmp_path, models={"history": history, "rounds": {"vae": 2}, "latent_scale": 1.0},
                            generated={"drawn": 16, "screened_out": 1, "animated": 8},
                            audited={"released": 7, "videos": 8}, evaluated=evaluated)
    pooled = {r["trained on"]: r["mae"] for r in summary["parity"] if r["tested on"] == "pooled"}
    ratio = summary["headline"]["synthetic-only MAE / real-trained MAE"]
    assert ratio == round(pooled["synthetic"] / pooled["real"], 2)
    html = (tmp_path / "summary" / "summary.html").read_text()
    assert "http" not in html and "<script" not in html and html.count("data:image/png;base64,") == 2
    for name in ("summary.json", "summary.md", "ef_scatter.png", "loss_curves.png"):
        assert (tmp_path / "summary" / name).stat().st_size > 0
    if find_chromium() is None:
        pytest.skip("Debian's chromium is not installed (the README's test command installs it)")
    assert render(tmp_path / "summary" / "summary.html", tmp_path / "summary.png") == []
    assert (tmp_path / "summary.png").stat().st_size > 10_000
