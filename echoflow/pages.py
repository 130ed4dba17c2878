"""The reports' page furniture: one stylesheet (``report.css``, inlined), a decision header, cards, tables, figures.

`echoflow.audit.report` (``audit.html``) and `echoflow.study.summary` (``summary.html``) build their pages from
these pieces, so both read alike and stay self-contained single files: the stylesheet and every image are inlined,
there are no scripts and no links. Text passed in is escaped here; ``body`` arguments are HTML already.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from importlib.resources import files
from typing import NamedTuple

STYLESHEET = "report.css"


def stylesheet() -> str:
    """The shared stylesheet's text (``echoflow/report.css``)."""
    return files("echoflow").joinpath(STYLESHEET).read_text(encoding="utf-8")


class Card(NamedTuple):
    """A headline number: ``value`` (shown large), ``label`` below it; ``tone`` ``"ok"``, ``"bad"`` or ``""``."""

    value: str
    label: str
    tone: str = ""


def page(title: str, *, headline: str, verdict: str, tone: str, sections: Iterable[str]) -> str:
    """A whole page: a header stating the decision in words (``headline``, then ``verdict``), then ``sections``.

    Args:
        title: the browser tab's title.
        headline: the header's one-line decision, e.g. "Audit passed: 5 of 6 videos released".
        verdict: a sentence or two under it (plain text).
        tone: ``"ok"`` (green), ``"bad"`` (red) or ``""`` (neutral).
        sections: HTML fragments, in order.
    """
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{stylesheet()}</style></head><body><main>"
            f"<header class='decision {tone}'><h1>{html.escape(headline)}</h1><p>{html.escape(verdict)}</p></header>"
            + "".join(sections) + "</main></body></html>")


def cards(items: Sequence[Card]) -> str:
    """A row of cards for the headline numbers."""
    return "<div class='cards'>" + "".join(
        f"<div class='card {c.tone}'><div class='value'>{html.escape(c.value)}</div>"
        f"<div class='label'>{html.escape(c.label)}</div></div>" for c in items) + "</div>"


def section(title: str, how: str, body: str) -> str:
    """A titled section: ``how`` is the one sentence on how to read it (plain text), ``body`` its HTML."""
    return f"<section><h2>{html.escape(title)}</h2><p class='how'>{html.escape(how)}</p>{body}</section>"


def table(header: Sequence[str], rows: Iterable[Sequence[object]], *, numeric: Sequence[int] = ()) -> str:
    """A table (escaped cells); columns in ``numeric`` are right-aligned. Headers carry their units, e.g. "τ (cosine)".

    It scrolls inside its own box if it is ever wider than the page, so the page itself never overflows.
    """
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{' class=num' if i in numeric else ''}>{html.escape(str(v))}</td>"
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>"


def figure(png_base64: str, *, alt: str, caption: str = "") -> str:
    """An inline PNG that fits the page (``max-width: 100%``), with an optional caption (plain text)."""
    text = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f"<figure><img alt='{html.escape(alt)}' src='data:image/png;base64,{png_base64}'>{text}</figure>")
