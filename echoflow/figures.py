"""Self-contained report pages: shared stylesheet, page furniture, figures (PNG) and video previews (GIF), inlined.

Everything is inlined as base64, so each page is one file with no script and no link.

`page`, `cards`, `section`, `table` and `figure` build ``audit.html`` (`echoflow.audit.page`) and
``summary.html`` (`echoflow.study.summary`) alike, styled by ``echoflow/report.css``. Text passed to them is
escaped; ``body``/``sections`` arguments are HTML already.

`ef_previews` is the one picture of videos both the audit report and the pipeline summary show: per EF range,
one generated and one real video, each as its first frame (PNG) and a short animated preview (GIF). Real frames
are the site's own data. The pages and GIF files that hold them belong in the operator's working directory
(``<workdir>/audit``, ``<workdir>/summary``); nothing holding a real frame may go under a ``released/`` folder,
and `ef_previews` refuses to write there.
"""

from __future__ import annotations

import base64
import html
import io
import shutil
from collections.abc import Iterable, Sequence
from importlib.resources import files
from pathlib import Path
from typing import NamedTuple

import matplotlib
import numpy as np

matplotlib.use("Agg")

from matplotlib.figure import Figure
from PIL import Image

from echoflow.data.echonet import VideoRecord, read_avi
from echoflow.errors import EchoFlowError

PREVIEW_SIZE = 64  # px per side of an animated preview
PREVIEW_FRAMES = 16  # most frames in an animated preview
PREVIEW_LEVEL_STEP = 8  # grey levels kept in a GIF: 256 / 8 = 32 (speckle in 256 levels hardly compresses: 61 vs 28 KB)
SHOWN_SIZE = 128  # CSS px per side on the page (pixels scaled up, not smoothed)


class EFRange(NamedTuple):
    """An EF range of the previews: ``low <= EF < high`` percent; ``slug`` names its GIF files."""

    label: str
    slug: str
    low: float
    high: float


EF_RANGES = (EFRange("EF < 40 %", "ef_below_40", -np.inf, 40.0), EFRange("EF 40–55 %", "ef_40_to_55", 40.0, 55.0),
             EFRange("EF ≥ 55 %", "ef_55_and_above", 55.0, np.inf))


def png_base64(fig: Figure, *, path: Path | None = None) -> str:
    """The figure as a base64 PNG, for ``<img src='data:image/png;base64,...'>`` (no external files).

    The same PNG is also written to ``path`` when given (e.g. to log as an MLflow artifact).
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def img_tag(data: bytes, *, mime: str, alt: str, size: int | None = None) -> str:
    """An ``<img>`` holding ``data`` inline (``data:<mime>;base64``), optionally shown ``size`` CSS px square."""
    shown = f" class='pixel' width='{size}' height='{size}'" if size else ""
    encoded = base64.b64encode(data).decode("ascii")
    return f"<img alt='{html.escape(alt)}'{shown} src='data:{mime};base64,{encoded}'>"


def png_bytes(frame: np.ndarray) -> bytes:
    """One (H, W) uint8 frame as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def gif_bytes(video: np.ndarray, *, fps: float, size: int = PREVIEW_SIZE, frames: int = PREVIEW_FRAMES) -> bytes:
    """A looping grayscale GIF of a (T, H, W) uint8 video: ``frames`` evenly spaced frames, ``size`` px square.

    Frames are shown for as long as the frames they stand for last, so the preview plays in real time; grey
    levels are rounded to 32 (`PREVIEW_LEVEL_STEP`) to keep the file small.
    """
    if video.ndim != 3 or video.dtype != np.uint8 or len(video) == 0:
        raise EchoFlowError(f"preview: expected (T>=1, H, W) uint8 video, got {video.shape} {video.dtype}")
    picks = np.unique(np.linspace(0, len(video) - 1, min(frames, len(video))).round().astype(int))
    step = PREVIEW_LEVEL_STEP
    images = [Image.fromarray(np.asarray(Image.fromarray(video[i]).resize((size, size), Image.Resampling.BILINEAR))
                              // step * step + step // 2) for i in picks]
    buffer = io.BytesIO()
    duration = round(1000.0 * len(video) / (len(picks) * fps))
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    return buffer.getvalue()


def pick_by_ef(records: Sequence[VideoRecord]) -> list[VideoRecord | None]:
    """Per `EF_RANGES` entry, the video with the median EF of those in the range (None when it has none)."""
    picks: list[VideoRecord | None] = []
    for ef_range in EF_RANGES:
        inside = sorted((r for r in records if ef_range.low <= r.ef < ef_range.high), key=lambda r: r.ef)
        picks.append(inside[len(inside) // 2] if inside else None)
    return picks


def _cells(record: VideoRecord | None, kind: str, ef_range: EFRange, out: Path) -> str:
    """Two table cells for one video: its first frame and its animated preview (also written to ``out``)."""
    if record is None:
        return "<td colspan='2'>no video in this range</td>"
    video = read_avi(record.path)
    gif = gif_bytes(video, fps=record.fps)
    (out / f"{ef_range.slug}_{kind}.gif").write_bytes(gif)
    caption = f"{record.file_name} ({record.site}), EF {record.ef:.0f} %"
    return (f"<td>{img_tag(png_bytes(video[0]), mime='image/png', alt=f'{kind} first frame', size=SHOWN_SIZE)}</td>"
            f"<td>{img_tag(gif, mime='image/gif', alt=f'{kind} clip', size=SHOWN_SIZE)}<br>"
            f"<small>{html.escape(caption)}</small></td>")


def ef_previews(generated: Sequence[VideoRecord], real: Sequence[VideoRecord], out: Path) -> str:
    """An HTML section: per EF range, a generated and a real video side by side (first frame + animated GIF).

    The GIFs are also written as ``out/<range>_{generated,real}.gif`` (``out`` is emptied first, so no stale
    preview survives), e.g. to log as MLflow artifacts. Each GIF is at most 16 frames of 64x64 (tens of KB).

    Args:
        generated: generated videos' FileList records (EF = the requested EF).
        real: real videos' records (e.g. every site's TRAIN rows). They are site data: see the module docstring.
        out: folder for the GIFs; must not lie under a ``released/`` folder.

    Raises:
        EchoFlowError: ``out`` is under ``released/``, or a picked video does not decode.
    """
    if "released" in out.resolve().parts:
        raise EchoFlowError(f"{out}: previews hold real frames and must never be written under released/")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = "".join(
        f"<tr><th>{html.escape(ef_range.label)}</th>{_cells(gen, 'generated', ef_range, out)}"
        f"{_cells(ref, 'real', ef_range, out)}</tr>"
        for ef_range, gen, ref in zip(EF_RANGES, pick_by_ef(generated), pick_by_ef(real), strict=True)
    )
    how = ("Per EF range, the video with the range's median EF: first frame, then the clip "
           f"({PREVIEW_FRAMES} frames at most, {PREVIEW_SIZE}x{PREVIEW_SIZE} px, playing in real time). Real videos "
           "are site data: this page stays in the operator's working directory.")
    return ("<section><h2>Generated and real videos by EF</h2>"
            f"<p class='how'>{html.escape(how)}</p><div class='scroll'>"
            "<table><tr><th>EF range (%)</th><th colspan='2'>generated</th><th colspan='2'>real</th></tr>"
            f"{rows}</table></div></section>")


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
