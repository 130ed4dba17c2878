"""The pipeline's summary: EF-parity table, EF scatter, per-site loss curves, generated vs real videos per EF range.

Written as JSON, Markdown, a self-contained HTML page and MLflow metrics. The page and its ``previews/`` GIFs show
real videos (site data): they stay in the operator's working directory and never go under ``released/``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import mlflow
import numpy as np

from echoflow.audit.report import SIMILARITY_PNG
from echoflow.data.echonet import VideoRecord, read_cohort
from echoflow.figures import Card, cards, ef_previews, figure, page, png_base64, section, table
from echoflow.study.protocol import seed_averaged_ratio

PARITY_GOAL = 1.1
"""Synthetic-only / real-trained MAE at which the summary calls the synthetic data a match (the paper's claim)."""


def parity_rows(evaluated: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (training source, test set): MAE, RMSE, R² with 95 % intervals.

    A source of several regressor seeds adds ``seeds`` and ``mae_per_seed``; its values are then means over
    seeds and its intervals Student-t over seeds.
    """
    rows = []
    for source, result in evaluated["sources"].items():
        for test_set, score in result["scores"].items():
            rows.append({"trained on": source, "tested on": test_set, **{k: score[k] for k in
                         ("mae", "mae_ci", "rmse", "r2", "r2_ci", "n", "seeds", "mae_per_seed") if k in score}})
    return rows


def seed_errors(evaluated: Mapping[str, Any], source: str) -> np.ndarray:
    """``source``'s signed EF errors (seeds, videos) on the real test videos (one row for a one-seed source)."""
    result = evaluated["sources"][source]
    return np.asarray(result.get("predictions", [result["prediction"]])) - np.asarray(evaluated["truth"])


def mae_cell(row: Mapping[str, Any]) -> str:
    """A row's MAE with its interval: ``m (low–high)`` (bootstrap over videos) or ``m ± t95`` over seeds."""
    if "seeds" in row:
        return f"{row['mae']:.2f} ± {row['mae_ci'][1] - row['mae']:.2f}"
    return f"{row['mae']:.2f} ({row['mae_ci'][0]:.2f}–{row['mae_ci'][1]:.2f})"


def per_seed_cell(row: Mapping[str, Any]) -> str:
    """A row's MAE per regressor seed (one seed: its only one)."""
    return ", ".join(f"{m:.2f}" for m in row.get("mae_per_seed", [row["mae"]]))


def parity_cells(row: Mapping[str, Any], *, seeded: bool) -> tuple[object, ...]:
    """A parity row's cells for the summary's tables; ``seeded`` adds the MAE per seed."""
    return (row["trained on"], row["tested on"], mae_cell(row), f"{row['rmse']:.2f}",
            f"{row['r2']:.3f} ({row['r2_ci'][0]:.2f}–{row['r2_ci'][1]:.2f})", row["n"],
            *((per_seed_cell(row),) if seeded else ()))


def _markdown(rows: list[dict[str, Any]], headline: Mapping[str, Any]) -> str:
    seeded = any("seeds" in r for r in rows)
    lines = ["| trained on | tested on (real test) | MAE (95 % CI) | RMSE | R² (95 % CI) | n |"
             + (" MAE per seed |" if seeded else ""), "|---|---|---|---|---|---|" + ("---|" if seeded else "")]
    lines += ["| " + " | ".join(str(cell) for cell in parity_cells(r, seeded=seeded)) + " |" for r in rows]
    lines += ["", *(f"- {key}: {value}" for key, value in headline.items())]
    return "\n".join(lines) + "\n"


def _scatter(evaluated: Mapping[str, Any]) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    truth = evaluated["truth"]
    for source, result in evaluated["sources"].items():
        axes[0].scatter(truth, result["prediction"], s=12, alpha=0.7,
                        label=f"{source} (seed 0)" if "predictions" in result else source)
    axes[0].plot([0, 100], [0, 100], "k--", lw=1)
    axes[0].set(xlabel="true EF (real test videos), %", ylabel="predicted EF, %", title="EF regressors",
                xlim=(0, 100), ylim=(0, 100))
    axes[0].legend()
    consistency = evaluated["consistency"]
    axes[1].scatter(consistency["requested"], consistency["measured"], s=12)
    axes[1].plot([0, 100], [0, 100], "k--", lw=1)
    axes[1].set(xlabel="requested EF, %", ylabel="EF measured by the real-trained regressor, %",
                title=f"released videos (R² {consistency['r2']:.2f})", xlim=(0, 100), ylim=(0, 100))
    return fig


def site_curves(rounds: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Per site, its training curve over a stage's rounds: (step, train loss) pairs.

    A site that sent its per-step curve (``train-loss-curve`` at ``train-loss-steps``, global local-step numbers)
    contributes every window; otherwise (older checkpoints, DP, SecAgg+) one point per round, at the round's
    number. Round boundaries: `round_ends`.
    """
    curves: dict[str, list[tuple[float, float]]] = {}
    for entry in rounds:
        for site, values in entry["sites"].items():
            if "train-loss-curve" in values:
                points = list(zip(values["train-loss-steps"], values["train-loss-curve"], strict=True))
            elif "train-loss" in values and not values.get("budget-exhausted", 0.0):
                points = [(float(entry["round"]), values["train-loss"])]
            else:
                points = []
            curves.setdefault(str(site), []).extend(points)
    return {site: points for site, points in sorted(curves.items()) if points}


def round_ends(rounds: Sequence[Mapping[str, Any]]) -> list[float]:
    """The x of each round's end in `site_curves`: its last step (or the round number without per-step curves)."""
    ends = []
    for entry in rounds:
        steps = [s for values in entry["sites"].values() for s in values.get("train-loss-steps", [])]
        ends.append(max(steps) if steps else float(entry["round"]))
    return ends


def _losses(history: Mapping[str, list[dict[str, Any]]]) -> Any:
    """Per stage, every site's training curve, round boundaries dotted; up to 3 panels a row."""
    columns = min(3, len(history))
    rows = -(-len(history) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(history):]:
        ax.axis("off")
    for ax, (stage, rounds) in zip(axes.flat, history.items(), strict=False):
        curves = site_curves(rounds)
        per_step = any("train-loss-curve" in v for e in rounds for v in e["sites"].values())
        for end in round_ends(rounds)[:-1] if per_step else ():  # per round, each point is a round
            ax.axvline(end, color="0.6", linestyle=":", linewidth=1)
        for site, points in curves.items():
            ax.plot(*zip(*points, strict=True), marker="" if per_step else "o", label=f"site {site}")
        ax.set(title=f"{stage}", xlabel="local step" if per_step else "round", ylabel="train loss")
        if curves:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def privacy_of(history: Mapping[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Stage -> the largest cumulative ε any site had spent after the stage (DP runs; {} without DP)."""
    spent = {stage: max((float(v.get("epsilon", 0.0)) for v in rounds[-1]["sites"].values()), default=0.0)
             for stage, rounds in history.items() if rounds}
    return spent if any(spent.values()) else {}


def _train_records(roots: Sequence[Path]) -> list[VideoRecord]:
    return [record for root in roots for record in read_cohort(root).records if record.split == "TRAIN"]


FIGURES = {  # section title and how to read each figure
    "ef_scatter": ("EF scatter", "Left: each real test video's true EF against each regressor's prediction (on the "
                   "dashed line = perfect). Right: the EF each released video was asked for against the EF the "
                   "real-trained regressor measures in it (on the line = the video shows the EF it was asked for)."),
    "loss_curves": ("Training curves per site", "Each site's training loss as it trained each stage; dotted lines "
                    "mark the end of a federated round (the server averaged the sites' weights there)."),
    "audit_similarity": ("Audit similarities", "The audit's histogram: generated frames' and held-out real patients' "
                         "max similarity to real training frames; right of τ (dashed) is withheld."),
}


def _page(rows: Sequence[Mapping[str, Any]], pooled: Mapping[str, Mapping[str, Any]], headline: Mapping[str, Any],
          audited: Mapping[str, Any], images: Mapping[str, str], videos: str) -> str:
    """The whole ``summary.html``: the parity verdict, cards, the parity table, figures, video previews."""
    real, synthetic = pooled["real"]["mae"], pooled["synthetic"]["mae"]
    ratio = synthetic / real
    why = ""
    if pooled["real"]["r2"] <= 0:  # the yardstick itself predicts no better than the mean EF
        verdict, tone = "not measurable", ""
        why = (f" Not measurable here: the real-trained regressor does not predict EF (R² {pooled['real']['r2']:.2f}), "
               "so matching its MAE says nothing.")
    elif ratio <= PARITY_GOAL:
        verdict, tone = "synthetic data matches real data", "ok"
    else:
        verdict, tone = "synthetic data does not yet match real data", ""
    items = [Card(f"{audited['released']} / {audited['videos']}", "videos released / generated"),
             Card(f"{real:.2f}", "MAE, EF %, regressor trained on real videos"),
             Card(f"{synthetic:.2f}", "MAE, EF %, regressor trained on released synthetic videos only"),
             Card(f"{ratio:.2f}×", f"synthetic-only / real-trained MAE (goal ≤ {PARITY_GOAL})",
                  tone or ("bad" if ratio > PARITY_GOAL and not why else ""))]
    for key, label in (("EF consistency of released videos (R²)", "R², requested vs measured EF of released videos"),
                       ("Fréchet distance in re-id space (released vs real test first frames)",
                        "Fréchet distance, re-id space (lower = closer to real)")):
        items.append(Card(str(headline[key]), label))
    seeded = any("seeds" in r for r in rows)
    table_rows = [parity_cells(r, seeded=seeded) for r in rows]
    parity = section("EF regression on real test videos",
                     "Each EF regressor is tested on held-out real videos (pooled, then per site): lower MAE and "
                     "RMSE and higher R² are better; parity means the synthetic-only row matches the real row."
                     + (" Rows of several regressor seeds show the mean over seeds ± its Student-t 95 % interval "
                        "(bootstrap intervals over videos otherwise)." if seeded else ""),
                     table(["trained on", "tested on (real test)", "MAE, EF % (95 % CI)", "RMSE, EF %",
                            "R² (95 % CI)", "n (videos)", *(("MAE per seed",) if seeded else ())], table_rows,
                           numeric=(2, 3, 4, 5)))
    figures = [section(*FIGURES.get(name, (name.replace("_", " "), "")), figure(data, alt=name))
               for name, data in images.items()]
    return page("EchoFlow pipeline summary",
                headline=f"EF parity: {verdict} ({ratio:.2f}×)",
                verdict=f"Synthetic-only MAE {synthetic:.2f} vs real-trained {real:.2f} EF %: an EF regressor trained "
                        "only on released synthetic videos against one trained on real videos, both tested on real "
                        f"test videos. {headline['released videos']}.{why}",
                tone=tone, sections=[cards(items), parity, *figures, videos])


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
    errors = {s: seed_errors(evaluated, s) for s in ("synthetic", "real")}
    ratio = seed_averaged_ratio(errors["synthetic"], errors["real"])  # one seed: the paired ratio of its errors
    seeds = max(len(e) for e in errors.values())
    headline = {
        "released videos": f"{audited['released']} of {audited['videos']} generated "
                           f"({generated['screened_out']} of {generated['drawn']} latent frames screened out first)",
        "synthetic-only MAE / real-trained MAE": round(pooled["synthetic"]["mae"] / pooled["real"]["mae"], 2),
        "its 95 % CI (paired bootstrap over real test videos)": f"[{ratio.low:.2f}, {ratio.high:.2f}]",
        "EF consistency of released videos (R²)": round(evaluated["consistency"]["r2"], 3),
        "Fréchet distance in re-id space (released vs real test first frames)": round(evaluated["frechet_reid"], 3),
    }
    if seeds > 1:
        headline["EF regressor seeds per arm"] = (f"{seeds} (seed + 0 … {seeds - 1}); MAE mean ± t 95 % over seeds, "
                                                  "the ratio's CI from per-video errors averaged over seeds")
        headline |= {f"{r['trained on']} MAE per seed": per_seed_cell(r) for r in pooled.values() if "seeds" in r}
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
    (out / "summary.html").write_text(_page(rows, pooled, headline, audited, images, videos))
    if mlflow.active_run() is not None:
        metrics = {f"parity.{r['trained on'].replace('+', '_and_')}.{r['tested on']}.{k}": float(r[k])
                   for r in rows for k in ("mae", "rmse", "r2")}
        if seeds > 1:  # the seeds' spread, each seed's MAE and the seed-averaged ratio with its CI
            for r in rows:
                if "seeds" in r:
                    name = f"parity.{r['trained on'].replace('+', '_and_')}.{r['tested on']}"
                    metrics[f"{name}.mae_t95"] = r["mae_ci"][1] - r["mae"]
                    metrics |= {f"{name}.mae_seed{k}": float(m) for k, m in enumerate(r["mae_per_seed"])}
            metrics |= {"parity_ratio": ratio.ratio, "parity_ratio_low": ratio.low, "parity_ratio_high": ratio.high}
        mlflow.log_metrics(metrics | {"released": float(audited["released"]),
                                      "consistency_r2": float(evaluated["consistency"]["r2"]),
                                      "frechet_reid": float(evaluated["frechet_reid"])})
    return summary
