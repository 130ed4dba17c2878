"""The LV volume curves the run's meter reads from real TRAIN clips and from a released set, by EF bin.

Per clip (the first clip, as the regressors read it): EDV and ESV (largest and smallest meter volume, pixel³), the
meter's EF, the first frame's phase ((V₀ − ESV) / (EDV − ESV): 1 at end-diastole, 0 at end-systole), heart cycles
per clip (the peak of the zero-padded spectrum of the volume curve) and the curve's travel in strokes (the summed
frame-to-frame volume change over EDV − ESV; about 2 per beat), and the travel per cycle by cycles per clip — a
clip whose every beat fills and empties fully travels ~2 strokes per cycle at any heart rate. The meter is the one
`echoflow evaluate video-flow` trains (kept in ``<workdir>/meter``; trained here if missing):

    python benchmarks/volume_curves.py runs/parity_fed runs/parity_fed/audit/released pipeline=parity
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from echoflow.cli.pipeline import with_pipeline
from echoflow.config import limit_threads, load_config
from echoflow.data.sites import SiteData
from echoflow.models.segmenter import LVSegmenter, area_length_volumes
from echoflow.study.ef_following import train_meter
from echoflow.study.evaluate import first_clips
from echoflow.study.models import Cohort, Models, stage_folder

BINS = ((0, 30), (30, 45), (45, 60), (60, 101))
CYCLE_BINS = ((0.5, 1.2), (1.2, 1.5), (1.5, 1.8), (1.8, 2.2), (2.2, 4.0))


def curve_table(name: str, meter: LVSegmenter, sites: Sequence[SiteData], *, frames: int, fps: float) -> None:
    """Print the per-EF-bin means of the curve measures of ``sites``' first clips (EF: their FileList EF)."""
    clips, label, _ = first_clips(sites, frames=frames, fps=fps)
    v, ef = area_length_volumes(meter.masks(clips)).numpy(), label.numpy()
    edv, esv = v.max(1), v.min(1)
    stroke = np.maximum(edv - esv, 1e-6)
    measures = {
        "EDV": edv, "ESV": esv, "meter EF": 100.0 * (1.0 - esv / np.maximum(edv, 1e-6)),
        "first-frame phase": (v[:, 0] - esv) / stroke,
        "cycles per clip": cycles(v), "travel (strokes)": np.abs(np.diff(v, axis=1)).sum(1) / stroke,
    }
    print(f"\n{name} ({len(ef)} clips)\n| EF bin | n | " + " | ".join(measures) + " |")
    for low, high in BINS:
        m = (ef >= low) & (ef < high)
        print(f"| {low}-{high} | {m.sum()} | " + " | ".join(f"{x[m].mean():.2f}" for x in measures.values()) + " |")
    c = measures["cycles per clip"]
    per_cycle = measures["travel (strokes)"] / c
    rows = [(low, high, (c >= low) & (c < high)) for low, high in CYCLE_BINS]
    print(f"RESULT strokes travelled per cycle by cycles per clip, {name}: " + ", ".join(
        f"{low}-{high}: {per_cycle[m].mean():.2f} (n {m.sum()})" for low, high, m in rows if m.any()))
    print(f"RESULT cycles per clip, {name}: mean {c.mean():.2f}, SD {c.std():.2f}, 10/50/90 % "
          f"{'/'.join(f'{q:.2f}' for q in np.percentile(c, [10, 50, 90]))}; correlation with EF "
          f"{np.corrcoef(c, ef)[0, 1]:+.2f}")


def cycles(volumes: np.ndarray, *, pad: int = 256) -> np.ndarray:
    """Heart cycles per clip of volume curves (N, T): the peak of their zero-padded spectrum, 0.5-4 cycles."""
    t = volumes.shape[1]
    centred = volumes - volumes.mean(1, keepdims=True)
    spectrum = np.abs(np.fft.rfft(centred, n=pad, axis=1))
    per_clip = np.fft.rfftfreq(pad) * t
    band = (per_clip > 0.5) & (per_clip < 4.0)
    return per_clip[band][spectrum[:, band].argmax(1)]


def main() -> None:
    workdir, released, *overrides = sys.argv[1:]
    limit_threads(2)
    cfg = load_config(with_pipeline([f"workdir={workdir}", *overrides]))
    cohort = Cohort.of(cfg)
    train = cohort.split("TRAIN")
    meter = train_meter(train, Models.load(cfg).vae, stage_folder(cfg, "meter"), steps=600, seed=cfg.seed)
    clip = {"frames": cfg.data.clip_frames, "fps": cfg.data.clip_fps}
    curve_table("real TRAIN", meter, train, **clip)
    curve_table(f"released {released}", meter, cohort.sites([Path(released)], "TRAIN"), **clip)


if __name__ == "__main__":
    main()
