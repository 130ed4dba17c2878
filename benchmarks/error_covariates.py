"""Which property of a real test video, besides its EF, does each parity arm's error depend on?

On a finished run tested on its held-out phantom test cohort (`data.test_patients` > 0), re-draws every test video's
phantom parameters from the cohort seed (the generator's per-video streams: anatomy, visit) and regresses each arm's
seed-mean error (reading - true EF, from ``<workdir>/pipeline/evaluate.json``) on the standardised EF and covariates
(EDV, heart rate, the ED frame's phase, preload, probe tilt, LV length, wall thickness, RV width). Prints each
coefficient (EF points per SD) with its OLS 95 % interval, and the mean error by heart beats per clip:

    python benchmarks/error_covariates.py runs/parity_fed

A regressor that reads real hearts by their LV motion alone shows only the EF term (its regression to the mean);
a term for heart rate or anatomy says which other property of the clips it learnt to read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from echoflow.data import phantom

COVARIATES = ("edv", "heart_rate", "ed_phase", "preload", "tilt", "lv_length", "wall", "rv_width")


def cohort_videos(workdir: Path) -> pd.DataFrame:
    """One row per test-cohort video, in the evaluation's order: EF and every covariate, re-drawn from the seed."""
    seed = int((workdir / "test_cohort" / "done").read_text().split()[1])
    rows = []
    for folder in sorted(p for p in (workdir / "test_cohort").iterdir() if p.is_dir()):
        site = int(folder.name.removeprefix("site_"))
        for r in pd.read_csv(folder / "FileList.csv").itertuples():
            patient, visit = int(r.FileName[4:8]), int(r.FileName.rsplit("V", 1)[1])
            rng = phantom.stream_rng(seed, phantom._ANATOMY, site, patient)
            anatomy, patient_ef = phantom.sample_anatomy(rng), phantom.sample_patient_ef(rng)
            v = phantom.sample_visit(phantom.stream_rng(seed, phantom._VISIT, site, patient, visit),
                                     patient_ef=patient_ef, frames=int(r.NumberOfFrames))
            period = phantom.FPS * 60.0 / v.heart_rate
            rows.append({"ef": r.EF, "edv": r.EDV, "heart_rate": v.heart_rate, "ed_phase": v.ed_frame / period,
                         "preload": v.preload, "tilt": v.tilt, "lv_length": anatomy.lv_length, "wall": anatomy.wall,
                         "rv_width": anatomy.rv_width, "beats": r.NumberOfFrames / period})
    return pd.DataFrame(rows)


def covariate_terms(videos: pd.DataFrame, error: np.ndarray) -> tuple[dict[str, tuple[float, float]], float]:
    """OLS of ``error`` on standardised EF and `COVARIATES`: name -> (coefficient, 95 % half-width); and R²."""
    names = ["ef", *COVARIATES]
    x = np.column_stack([np.ones(len(error))] + [(videos[n] - videos[n].mean()) / videos[n].std() for n in names])
    beta, *_ = np.linalg.lstsq(x, error, rcond=None)
    resid = error - x @ beta
    se = np.sqrt(np.diag(np.linalg.inv(x.T @ x)) * resid.var(ddof=x.shape[1]))
    return {n: (float(b), float(1.96 * s)) for n, b, s in zip(names, beta[1:], se[1:], strict=True)}, \
        float(1.0 - resid.var() / error.var())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    args = parser.parse_args()
    results = json.loads((args.workdir / "pipeline" / "evaluate.json").read_text())
    truth = np.asarray(results["truth"])
    videos = cohort_videos(args.workdir)
    if len(videos) != len(truth) or not np.allclose(videos.ef, truth, atol=1e-3):
        raise SystemExit(f"{args.workdir}: the test cohort does not match evaluate.json's test videos")
    print("correlation with EF: " + ", ".join(f"{n} {np.corrcoef(videos[n], videos.ef)[0, 1]:+.2f}"
                                              for n in COVARIATES))
    beats = pd.cut(videos.beats, [0, 1.2, 1.5, 1.8, 3.0])
    for arm, source in results["sources"].items():
        error = np.asarray(source.get("predictions", [source["prediction"]])).mean(0) - truth
        terms, r2 = covariate_terms(videos, error)
        print(f"RESULT error terms, {arm} (EF points per SD; {len(truth)} videos, seed-mean readings; R² {r2:.2f}): "
              + ", ".join(f"{n} {b:+.2f} ± {h:.2f}" for n, (b, h) in terms.items()))
        by_beats = pd.Series(error).groupby(beats, observed=True).mean()
        print(f"RESULT mean error by beats per clip, {arm}: "
              + ", ".join(f"{i.left}-{i.right}: {e:+.1f}" for i, e in by_beats.items()))


if __name__ == "__main__":
    main()
