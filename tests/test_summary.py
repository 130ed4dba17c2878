import io
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageSequence

from echoflow.errors import EchoFlowError
from echoflow.figures import EF_RANGES, ef_previews, gif_bytes, pick_by_ef
from echoflow.study.evaluate import regression
from echoflow.study.summary import round_ends, site_curves, write_summary
from tests.ef_videos import write_ef_videos


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


def write_fake_summary(workdir: Path) -> Path:
    """A summary of fake results, released videos in 2 of 3 EF ranges and 2 real sites; returns summary.html."""
    history = {"vae": [{"round": r, "sites": {"0": {"train-loss": 1.0 / r}, "1": {"train-loss": 1.2 / r}}}
                       for r in (1, 2)]}
    released = workdir / "audit" / "released"
    write_ef_videos(released, [30.0, 62.0, 70.0], site="synthetic", seed=1)
    roots = [workdir / "cohort" / "site_00", workdir / "cohort" / "site_01"]
    write_ef_videos(roots[0], [35.0, 58.0], site="site_00", seed=2)
    write_ef_videos(roots[1], [44.0, 52.0, 66.0], site="site_01", size=112, seed=3)
    Image.new("L", (40, 20), 90).save(workdir / "audit" / "similarity.png")  # as the audit would have drawn it
    write_summary(workdir, models={"history": history, "rounds": {"vae": 2}, "latent_scale": 1.0},
                  generated={"drawn": 16, "screened_out": 1, "animated": 8}, audited={"released": 7, "videos": 8},
                  evaluated=fake_results(np.random.default_rng(0)), released=released, real_roots=roots)
    return workdir / "summary" / "summary.html"


def test_summary_files_ratio_and_previews(tmp_path: Path) -> None:
    html = write_fake_summary(tmp_path).read_text()
    out = tmp_path / "summary"
    summary = json.loads((out / "summary.json").read_text())
    pooled = {r["trained on"]: r["mae"] for r in summary["parity"] if r["tested on"] == "pooled"}
    ratio = summary["headline"]["synthetic-only MAE / real-trained MAE"]
    assert ratio == round(pooled["synthetic"] / pooled["real"], 2)
    interval = summary["headline"]["its 95 % CI (paired bootstrap over real test videos)"]
    low, high = map(float, interval[1:-1].split(", "))
    assert low < ratio < high
    assert "http" not in html and "<script" not in html
    # 2 figures + the audit's histogram + 5 first frames, and 5 GIFs: no generated video has an EF in 40-55 %
    assert html.count("data:image/png;base64,") == 3 + 5 and html.count("data:image/gif;base64,") == 5
    assert "<h2>Audit similarities</h2>" in html and "<img alt='audit_similarity'" in html
    assert html.count("no video in this range") == 1
    assert "site_01V001 (site_01), EF 52 %" in html  # the real 40-55 % pick: upper median of 44 and 52
    gifs = sorted(p.name for p in (out / "previews").glob("*.gif"))
    assert gifs == ["ef_40_to_55_real.gif", "ef_55_and_above_generated.gif", "ef_55_and_above_real.gif",
                    "ef_below_40_generated.gif", "ef_below_40_real.gif"]
    for name in ("summary.json", "summary.md", "ef_scatter.png", "loss_curves.png"):
        assert (out / name).stat().st_size > 0


def test_gif_preview_is_small_and_plays_the_clip_in_real_time() -> None:
    t = np.arange(40)[:, None, None]
    ramp = np.broadcast_to(np.linspace(0, 255, 112)[None, None, :], (40, 112, 112))
    video = ((ramp + 6 * t) % 256).astype(np.uint8)  # a bright band moving right, 40 frames at 25 fps
    gif = Image.open(io.BytesIO(gif_bytes(video, fps=25.0)))
    frames = [np.asarray(frame.convert("L"), dtype=float) for frame in ImageSequence.Iterator(gif)]
    assert len(frames) == 16 and gif.size == (64, 64) and gif.info["loop"] == 0
    assert gif.info["duration"] == 100  # ms; 40 frames / 16 shown at 25 fps: each stands for 2.5 frames
    first = np.asarray(Image.fromarray(video[0]).resize((64, 64), Image.Resampling.BILINEAR), dtype=float)
    assert np.abs(frames[0] - first).max() <= 4 and np.abs(frames[-1] - frames[0]).mean() > 20
    with pytest.raises(EchoFlowError, match="uint8"):
        gif_bytes(video.astype(np.float32), fps=25.0)


def test_pick_by_ef_takes_each_ranges_median(tmp_path: Path) -> None:
    record = write_ef_videos(tmp_path, [50.0], site="s")[0]
    records = [replace(record, ef=ef, file_name=str(ef)) for ef in (90.0, 10.0, 40.0, 20.0, 55.0, 54.9, 30.0)]
    picks = pick_by_ef(records)
    assert [p.ef if p else None for p in picks] == [20.0, 54.9, 90.0] and len(picks) == len(EF_RANGES)
    assert pick_by_ef(records[:1]) == [None, None, records[0]]


def test_previews_refuse_a_released_folder(tmp_path: Path) -> None:
    records = write_ef_videos(tmp_path / "real", [30.0], site="s")
    with pytest.raises(EchoFlowError, match="released"):
        ef_previews([], records, tmp_path / "audit" / "released" / "previews")
    assert not (tmp_path / "audit" / "released").exists()


def test_training_curves_are_per_step_with_round_ends_and_fall_back_to_rounds() -> None:
    rounds = [{"round": r, "sites": {
        "0": {"train-loss": 1.0, "train-loss-curve": [3.0 - r, 2.5 - r, 2.0 - r],
              "train-loss-steps": [3.0 * r - 2, 3.0 * r - 1, 3.0 * r]},
        "1": {"train-loss": 0.0, "budget-exhausted": 1.0}}} for r in (1, 2)]
    assert site_curves(rounds) == {"0": [(1.0, 2.0), (2.0, 1.5), (3.0, 1.0), (4.0, 1.0), (5.0, 0.5), (6.0, 0.0)]}
    assert round_ends(rounds) == [3.0, 6.0]  # the dotted round boundaries, at each round's last local step
    plain = [{"round": r, "sites": {"0": {"train-loss": 1.0 / r}}} for r in (1, 2)]  # DP, SecAgg+, old checkpoints
    assert site_curves(plain) == {"0": [(1.0, 1.0), (2.0, 0.5)]} and round_ends(plain) == [1.0, 2.0]
