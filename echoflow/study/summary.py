"""The pipeline's summary: EF-parity table, EF scatter, per-site loss curves, generated vs real videos per EF range.

Written as JSON, Markdown, a self-contained HTML page and MLflow metrics. The page and its ``previews/`` GIFs show
real videos (site data): they stay in the operator's working directory and never go under ``released/``.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import mlflow

from echoflow.audit.report import SIMILARITY_PNG
from echoflow.data.echonet import VideoRecord, read_cohort
from echoflow.figures import ef_previews, png_base64


def parity_rows(evaluated: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (training source, test set): MAE, RMSE, R² with 95 % intervals."""
    rows = []
    for source, result in evaluated["sources"].items():
        for test_set, score in result["scores"].items():
            rows.append({"trained on": source, "tested on": test_set, **{k: score[k] for k in
                         ("mae", "mae_ci", "rmse", "r2", "r2_ci", "n")}})
    return rows


def _markdown(rows: list[dict[str, Any]], headline: Mapping[str, Any]) -> str:
    lines = ["| trained on | tested on (real TEST) | MAE (95 % CI) | RMSE | R² (95 % CI) | n |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trained on']} | {r['tested on']} | {r['mae']:.2f} ({r['mae_ci'][0]:.2f}–"
                     f"{r['mae_ci'][1]:.2f}) | {r['rmse']:.2f} | {r['r2']:.3f} ({r['r2_ci'][0]:.2f}–"
                     f"{r['r2_ci'][1]:.2f}) | {r['n']} |")
    lines += ["", *(f"- {key}: {value}" for key, value in headline.items())]
    return "\n".join(lines) + "\n"


def _scatter(evaluated: Mapping[str, Any]) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    truth = evaluated["truth"]
    for source, result in evaluated["sources"].items():
        axes[0].scatter(truth, result["prediction"], s=12, alpha=0.7, label=source)
    axes[0].plot([0, 100], [0, 100], "k--", lw=1)
    axes[0].set(xlabel="true EF (real TEST videos), %", ylabel="predicted EF, %", title="EF regressors",
                xlim=(0, 100), ylim=(0, 100))
    axes[0].legend()
    consistency = evaluated["consistency"]
    axes[1].scatter(consistency["requested"], consistency["measured"], s=12)
    axes[1].plot([0, 100], [0, 100], "k--", lw=1)
    axes[1].set(xlabel="requested EF, %", ylabel="EF measured by the real-trained regressor, %",
                title=f"released videos (R² {consistency['r2']:.2f})", xlim=(0, 100), ylim=(0, 100))
    return fig


def _losses(history: Mapping[str, list[dict[str, Any]]]) -> Any:
    fig, axes = plt.subplots(1, len(history), figsize=(4 * len(history), 3.5), squeeze=False)
    for ax, (stage, rounds) in zip(axes[0], history.items(), strict=True):
        sites = sorted({site for entry in rounds for site in entry["sites"]})
        for site in sites:
            points = [(e["round"], e["sites"][site]["train-loss"]) for e in rounds
                      if site in e["sites"] and "train-loss" in e["sites"][site]]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=f"site {site}")
        ax.set(title=f"{stage}: train loss per site", xlabel="round")
        ax.legend(fontsize=7)
    return fig


def privacy_of(history: Mapping[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Stage -> the largest cumulative ε any site had spent after the stage (DP runs; {} without DP)."""
    spent = {stage: max((float(v.get("epsilon", 0.0)) for v in rounds[-1]["sites"].values()), default=0.0)
             for stage, rounds in history.items() if rounds}
    return spent if any(spent.values()) else {}


def _train_records(roots: Sequence[Path]) -> list[VideoRecord]:
    return [record for root in roots for record in read_cohort(root).records if record.split == "TRAIN"]


def write_summary(workdir: Path, *, models: Mapping[str, Any], generated: Mapping[str, Any],
                  audited: Mapping[str, Any], evaluated: Mapping[str, Any], released: Path | None = None,
                  real_roots: Sequence[Path] = ()) -> dict[str, Any]:
    """Write ``<workdir>/summary/{summary.json,summary.md,summary.html,*.png,previews/*.gif}``; log the headline.

    The page also shows the audit's similarity histogram when ``<workdir>/audit/similarity.png`` exists.

    ``released`` (the audit's ``released/`` cohort folder) and ``real_roots`` (the sites' cohort folders, whose
    TRAIN videos are used) feed the generated-vs-real previews (`ef_previews`); without them there are none.
    """
    out = workdir / "summary"
    out.mkdir(parents=True, exist_ok=True)
    rows = parity_rows(evaluated)
    pooled = {r["trained on"]: r for r in rows if r["tested on"] == "pooled"}
    headline = {
        "released videos": f"{audited['released']} of {audited['videos']} generated "
                           f"({generated['screened_out']} of {generated['drawn']} latent frames screened out first)",
        "synthetic-only MAE / real-trained MAE": round(pooled["synthetic"]["mae"] / pooled["real"]["mae"], 2),
        "EF consistency of released videos (R²)": round(evaluated["consistency"]["r2"], 3),
        "Fréchet distance in re-id space (released vs real TEST first frames)": round(evaluated["frechet_reid"], 3),
    }
    privacy = privacy_of(models["history"])
    if privacy:
        headline["differential privacy (unit: one patient, all their videos)"] = (
            "cumulative ε per site after " + ", ".join(f"{stage} {eps:.2f}" for stage, eps in privacy.items()))
    figures = {"ef_scatter": _scatter(evaluated)}
    if models["history"]:  # federated rounds (centralized training has none)
        figures["loss_curves"] = _losses(models["history"])
    images = {}
    for name, fig in figures.items():
        images[name] = png_base64(fig, path=out / f"{name}.png")
        plt.close(fig)
    similarity = workdir / "audit" / SIMILARITY_PNG  # the audit's histogram: generated and held-out vs real TRAIN
    if similarity.is_file():
        images["audit_similarity"] = base64.b64encode(similarity.read_bytes()).decode("ascii")
    markdown = _markdown(rows, headline)
    (out / "summary.md").write_text(markdown)
    summary = {"headline": headline, "parity": rows, "generated": dict(generated), "audit": dict(audited),
               "rounds": models["rounds"], "latent_scale": models["latent_scale"], "epsilon_after_stage": privacy}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    videos = ef_previews(read_cohort(released).records if released else [], _train_records(real_roots),
                         out / "previews") if released or real_roots else ""
    body = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in headline.items())
    table = "".join(f"<tr><td>{r['trained on']}</td><td>{r['tested on']}</td><td>{r['mae']:.2f}</td>"
                    f"<td>{r['rmse']:.2f}</td><td>{r['r2']:.3f}</td><td>{r['n']}</td></tr>" for r in rows)
    (out / "summary.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>EchoFlow pipeline summary</title></head><body>"
        f"<h1>EchoFlow pipeline summary</h1><ul>{body}</ul><h2>EF regression on real TEST videos</h2>"
        "<table border='1'><tr><th>trained on</th><th>tested on</th><th>MAE</th><th>RMSE</th><th>R²</th><th>n</th>"
        f"</tr>{table}</table>"
        + "".join(f"<h2>{name.replace('_', ' ')}</h2><img alt='{name}' src='data:image/png;base64,{data}'>"
                  for name, data in images.items())
        + videos + "</body></html>")
    if mlflow.active_run() is not None:
        mlflow.log_metrics({f"parity.{r['trained on'].replace('+', '_and_')}.{r['tested on']}.{k}": float(r[k])
                            for r in rows for k in ("mae", "rmse", "r2")}
                           | {"released": float(audited["released"]),
                              "consistency_r2": float(evaluated["consistency"]["r2"]),
                              "frechet_reid": float(evaluated["frechet_reid"])})
    return summary
