"""``audit.html``: the audit's decision in words, headline cards, per-site table, canaries, figures.

Presentation only: the numbers come from the ``audit.json`` document (`echoflow.audit.report.build_report`, plus
what `echoflow.audit.run.run_audit` adds: ``videos``, per-sample ``canary`` flags and ``run``). `tally` reads videos,
frames and canaries apart from that document; it counts nothing the document does not hold.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from echoflow.audit.calibrate import Calibration
from echoflow.figures import Card, cards, figure, page, section, table


@dataclass(frozen=True)
class Tally:
    """Videos, audited frames and canaries of one audit, each counted apart.

    Attributes:
        videos, videos_released: generated video files and how many passed (None when the report has no
            per-video decisions, e.g. an audit of bare embeddings).
        frames, frames_withheld: genuine generated frames audited (canaries excluded) and how many reached τ.
        canaries, canaries_caught: planted real-frame copies and how many the audit withheld.
        every: every ``every``-th frame of each video was audited (None when unknown).
        videos_partial: videos of which some frames were not audited (``every`` > 1).
    """

    videos: int | None
    videos_released: int | None
    frames: int
    frames_withheld: int
    canaries: int
    canaries_caught: int
    every: int | None
    videos_partial: int = 0


def tally(report: Mapping[str, Any]) -> Tally:
    """Videos, genuine frames and canaries apart, as the report's ``counts`` (`echoflow.audit.report.counts_of`)."""
    counts = report["counts"]
    planted = report.get("canaries", {}).get("all", {"caught": 0, "planted": counts["canaries"]})
    per_video = "videos" in report  # an audit of bare embeddings has no video decisions
    return Tally(
        videos=counts["videos"] if per_video else None,
        videos_released=counts["videos_released"] if per_video else None,
        frames=counts["generated"], frames_withheld=counts["withheld"],
        canaries=int(planted["planted"]), canaries_caught=int(planted["caught"]),
        every=counts.get("every"), videos_partial=counts.get("videos_partially_audited", 0),
    )


def _decision(report: Mapping[str, Any], t: Tally) -> tuple[str, str, str]:
    """(headline, verdict, tone) of the page header."""
    if report["status"] == "failed":
        return ("Audit failed: nothing released",
                "A site did not answer or its calibration failed, so no generated video may leave; see the problems "
                "below.", "bad")
    if t.videos is not None:
        withheld = t.videos - (t.videos_released or 0)
        return (f"Audit passed: {t.videos_released} of {t.videos} generated videos released",
                f"{withheld} video(s) withheld: a video is withheld when any of its audited frames is at least as "
                "similar to a real training frame as τ. Only released videos are copied to released/.",
                "ok" if withheld == 0 else "")
    return (f"Audit passed: {t.frames - t.frames_withheld} of {t.frames} generated samples released",
            "A sample is withheld when it is at least as similar to a real training sample as τ.", "ok")


def _cards(report: Mapping[str, Any], t: Tally, calibration: Calibration) -> str:
    items = []
    if t.videos is not None:
        items += [Card(f"{t.videos_released} / {t.videos}", "videos released / generated", "ok"),
                  Card(str(t.videos - (t.videos_released or 0)), "videos withheld",
                       "bad" if t.videos != t.videos_released else "")]
    ordinal = {2: "2nd", 3: "3rd"}.get(t.every or 1, f"{t.every}th")
    every = (f" (every {ordinal} frame: {t.videos_partial} of {t.videos} videos partially audited)"
             if t.every and t.every > 1 else "")
    items.append(Card(f"{t.frames_withheld} / {t.frames}", f"generated frames withheld / audited{every}"))
    if t.canaries:
        share = 100.0 * t.canaries_caught / t.canaries
        items.append(Card(f"{t.canaries_caught} / {t.canaries}", f"canaries caught ({share:.0f} %)",
                          "ok" if t.canaries_caught == t.canaries else "bad"))
    items.append(Card(f"{calibration.global_threshold:.3f}",
                      f"τ, cosine similarity (p{calibration.percentile:g} of held-out real → real train)"))
    items.append(Card(f"{report['seconds']:.2f} s", "search time, all sites"))
    return cards(items)


def _sites(report: Mapping[str, Any]) -> str:
    rows = []
    for name, s in report["sites"].items():
        recall = s.get("threshold_recall")
        scanned = s.get("scanned")
        rows.append((name, s["withheld"], f"{s['threshold']:.4f}", s.get("index", "?"), s.get("ntotal", "—"),
                     "—" if recall is None else f"{100 * recall:.1f} %",
                     "—" if scanned is None else f"{100 * scanned:.1f} %"))
    body = table(["site", "samples withheld (frames + canaries)", "τ (cosine similarity)", "index",
                  "real train frames indexed", "threshold recall (% of over-τ pairs found)",
                  "pairs compared (% of all)"], rows, numeric=(1, 2, 4, 5, 6))
    approx = report["approximate"]
    note = (f"<p class='how'>{html.escape(approx['note'])} Similarities reported as lower bounds: "
            f"{approx['inexact_similarities']}.</p>")
    return section("Sites", "One row per site: τ is the similarity at or above which a generated frame counts as a "
                   "copy of that site's patients; threshold recall 100 % means no real frame over τ was missed "
                   "(exact decision); an exact index compares every pair (100 %).", body + note)


def _canaries(report: Mapping[str, Any]) -> str:
    planted = report.get("canaries")
    if not planted:
        return ""
    rows = [(name, c["planted"], c["caught"], f"{100 * c['caught'] / max(c['planted'], 1):.0f} %")
            for name, c in planted.items() if name != "all"]
    if "all" in planted:
        rows.append(("all", planted["all"]["planted"], planted["all"]["caught"],
                     f"{100 * planted['all']['caught'] / max(planted['all']['planted'], 1):.0f} %"))
    return section("Canaries (not generated: planted copies of real training frames)",
                   "Each canary is a real training frame, copied exactly or with a twist (shifted, re-gained, "
                   "re-speckled, mirrored), mixed among the generated frames; a good audit withholds all of them. "
                   "Canaries are counted here only, never among the generated frames or videos.",
                   table(["copy", "planted (frames)", "caught (frames)", "caught (%)"], rows, numeric=(1, 2, 3)))


def audit_page(report: Mapping[str, Any], calibration: Calibration, *, histogram: str = "", pairs: str = "",
               videos: str = "") -> str:
    """The whole ``audit.html``.

    Args:
        report: the ``audit.json`` document.
        calibration: where τ came from.
        histogram: base64 PNG of the similarity histograms ("" when the audit failed).
        pairs: base64 PNG of the closest (generated, real) pairs ("" for none).
        videos: the `echoflow.figures.ef_previews` section ("" for none).
    """
    t = tally(report)
    headline, verdict, tone = _decision(report, t)
    problems = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in report["failures"].items())
    parts = [_cards(report, t, calibration),
             section("Problems", "Why the audit failed.", f"<ul class='problems'>{problems}</ul>") if problems else "",
             _sites(report), _canaries(report)]
    if histogram:
        parts.append(section(
            "Similarities", "How close each generated frame came to its nearest real training frame (blue), against "
            "how close held-out real patients come to the training patients (orange); frames right of the dashed "
            "line τ are withheld.", figure(histogram, alt="histogram", caption="x: max cosine similarity; y: density")))
    if pairs:
        parts.append(section(
            "Closest pairs", "The generated frames closest to τ, each above its nearest real training frame; a "
            "withheld one should look like a copy, a released one should not.",
            figure(pairs, alt="pairs", caption="top: generated frame; bottom: nearest real frame")))
    parts.append(videos)
    return page("EchoFlow audit", headline=headline, verdict=verdict, tone=tone, sections=parts)
