"""The audit's record: ``audit.json``, a self-contained ``audit.html``, and MLflow logging.

``audit.json`` follows ``audit.schema.json`` (beside this file); ``audit.html`` inlines its figures as base64
PNG (GIF for the animated previews) and has no scripts and no links, so it opens anywhere, offline. The page
and its ``previews/`` GIFs show real frames (closest pairs, real videos per EF range): they stay in the
operator's working directory and never go under ``released/`` (see `echoflow.figures`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from echoflow.audit.calibrate import Calibration
from echoflow.audit.canaries import DCRStats
from echoflow.audit.decide import AuditResult
from echoflow.audit.page import audit_page
from echoflow.data.echonet import VideoRecord
from echoflow.figures import ef_previews, png_base64

SCHEMA_PATH = Path(__file__).with_name("audit.schema.json")
SIMILARITY_PNG = "similarity.png"  # the histogram, also as a file beside audit.html (MLflow, the pipeline summary)
APPROXIMATE_NOTE = (
    "Every similarity >= tau is exact, so every decision is exact. Below tau, a bounded-IVF site may report a "
    "lower bound of the true maximum (exact=false); such samples are released correctly all the same."
)


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def build_report(
    result: AuditResult,
    calibration: Calibration,
    *,
    index_info: Mapping[str, Mapping[str, Any]] | None = None,
    canaries: Mapping[str, tuple[int, int]] | None = None,
    dcr: DCRStats | None = None,
    genuine: np.ndarray | None = None,
    videos: Sequence[tuple[bool, int, int]] = (),
    every: int = 1,
) -> dict[str, Any]:
    """The ``audit.json`` document (see the schema for every field).

    Args:
        result: the decision.
        calibration: where τ came from.
        index_info: per site, e.g. ``{"index": "bounded_ivf", "ntotal": 250000, "threshold_recall": 1.0}``.
        canaries: `CanaryPlan.score` output.
        dcr: `dcr_stats` output.
        genuine: (G,) bool, False for a planted canary row (default: every row is a generated frame).
        videos: per generated video (released, frames audited, frames in the video).
        every: the audit's frame stride k (every k-th frame of a video is audited).
    """
    withheld = ~result.release
    sites: dict[str, Any] = {}
    for name in result.sites:
        mine = withheld & (result.site == name)
        sites[name] = {
            "withheld": int(mine.sum()) if not result.failed else 0,
            "threshold": result.thresholds[name],
            "scanned": result.scanned.get(name),
        } | dict((index_info or {}).get(name, {}))
    report: dict[str, Any] = {
        "version": 1,
        "status": "failed" if result.failed else "passed",
        "failures": dict(result.failures),
        "counts": counts_of(result, genuine=genuine, videos=videos, every=every),
        "sites": sites,
        "calibration": {
            "percentile": calibration.percentile,
            "global_threshold": calibration.global_threshold,
            "site_threshold": dict(calibration.site_threshold),
        },
        "approximate": {"inexact_similarities": int((~result.exact).sum()), "note": APPROXIMATE_NOTE},
        "seconds": result.seconds,
        "samples": [
            {
                "id": i,
                "release": bool(result.release[i]),
                "site": str(result.site[i]),
                "real_id": int(result.real_id[i]),
                "similarity": _num(result.similarity[i]),
                "threshold": _num(result.threshold[i]),
                "exact": bool(result.exact[i]),
            }
            for i in range(len(result.release))
        ],
    }
    if canaries is not None:
        report["canaries"] = {t: {"caught": c, "planted": p} for t, (c, p) in canaries.items()}
    if dcr is not None:
        report["dcr"] = asdict(dcr) | {"dcr_train_quantiles": list(dcr.dcr_train_quantiles)}
    return report


def counts_of(result: AuditResult, *, genuine: np.ndarray | None, videos: Sequence[tuple[bool, int, int]],
              every: int) -> dict[str, int]:
    """Generated frames (canaries apart), videos (released, withheld, partially audited) and the stride k."""
    real = np.ones(len(result.release), dtype=bool) if genuine is None else np.asarray(genuine, dtype=bool)
    return {
        "generated": int(real.sum()),
        "released": int((result.release & real).sum()),
        "withheld": int((~result.release & real).sum()),
        "canaries": int((~real).sum()),
        "every": int(every),
        "videos": len(videos),
        "videos_released": sum(1 for released, _, _ in videos if released),
        "videos_withheld": sum(1 for released, _, _ in videos if not released),
        "videos_partially_audited": sum(1 for _, audited, total in videos if audited < total),
    }


def _histogram(result: AuditResult, calibration: Calibration, path: Path) -> str:
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    finite = result.similarity[np.isfinite(result.similarity)]
    real = calibration.heldout_to_all
    for values, label in ((finite, "generated → nearest real"), (real, "real held-out → real train")):
        ax.hist(values, bins=200, range=(-1.0, 1.0), alpha=0.6, density=True, label=label)
    ax.axvline(calibration.global_threshold, color="k", linestyle="--", label=f"τ = {calibration.global_threshold:.3f}")
    lo = float(min(finite.min(initial=1.0), calibration.heldout_to_all.min(initial=1.0)))  # federated: none sent
    ax.set_xlim(max(-1.0, lo - 0.05), 1.0)
    ax.set_xlabel("max similarity")
    ax.legend(loc="upper left", fontsize=8)
    return png_base64(fig, path=path)


def _pairs_figure(pairs: Sequence[tuple[np.ndarray, np.ndarray, str]]) -> str:
    """The pairs side by side: one column per pair, generated frame above its nearest real frame."""
    fig = Figure(figsize=(1.7 * len(pairs), 3.9))
    axes = fig.subplots(2, len(pairs), squeeze=False)
    for column, (gen, real, caption) in enumerate(pairs):
        for ax, image, title in ((axes[0][column], gen, caption.replace(": ", ":\n", 1)),
                                 (axes[1][column], real, "nearest real")):
            ax.imshow(np.squeeze(image), cmap="gray", vmin=-1, vmax=1)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    return png_base64(fig)


def write_report(
    report: Mapping[str, Any],
    calibration: Calibration,
    result: AuditResult,
    out_dir: Path,
    *,
    pairs: Sequence[tuple[np.ndarray, np.ndarray, str]] = (),
    generated_videos: Sequence[VideoRecord] = (),
    real_videos: Sequence[VideoRecord] = (),
) -> tuple[Path, Path]:
    """Write ``audit.json`` and ``audit.html`` into ``out_dir``; return both paths.

    With videos given, the page also shows a generated and a real video per EF range (`ef_previews`), whose
    GIFs are written to ``out_dir/previews/``.

    Args:
        report: `build_report` output.
        calibration: for the held-out→train histogram and τ.
        result: for the generated→real histogram.
        out_dir: created if missing.
        pairs: optional closest (generated, real) thumbnails, each (H, W) or (1, H, W) in [-1, 1], with a caption.
        generated_videos: the audited videos' FileList records (EF = requested EF).
        real_videos: real videos' records (site data, shown on this page only).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "audit.json", out_dir / "audit.html"
    json_path.write_text(json.dumps(report, indent=1))
    videos = ef_previews(generated_videos, real_videos, out_dir / "previews") if generated_videos or real_videos else ""
    (out_dir / SIMILARITY_PNG).unlink(missing_ok=True)  # a failed audit draws none: no stale one may stand for it
    histogram = "" if result.failed else _histogram(result, calibration, out_dir / SIMILARITY_PNG)
    html_path.write_text(audit_page(report, calibration, histogram=histogram,
                                    pairs=_pairs_figure(pairs) if pairs else "", videos=videos))
    return json_path, html_path


def log_to_mlflow(report: Mapping[str, Any], paths: Sequence[Path]) -> bool:
    """Log counts and timing as metrics, the report files, histogram and ``previews/`` GIFs as artifacts (MLflow).

    Returns False (and logs nothing) when no run is active.
    """
    import mlflow

    if mlflow.active_run() is None:
        return False
    counts = report["counts"]
    mlflow.log_metrics({
        "audit_released": counts["released"], "audit_withheld": counts["withheld"],
        "audit_failed": float(report["status"] == "failed"), "audit_seconds": report["seconds"],
        "audit_inexact": report["approximate"]["inexact_similarities"],
    })
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path="audit")
    if (similarity := paths[0].parent / SIMILARITY_PNG).is_file():
        mlflow.log_artifact(str(similarity), artifact_path="audit")
    previews = paths[0].parent / "previews"
    if previews.is_dir():
        mlflow.log_artifacts(str(previews), artifact_path="audit/previews")
    return True
