"""Figures for self-contained reports: matplotlib (headless) to PNG files and base64 for inlining in HTML."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure


def png_base64(fig: Figure) -> str:
    """The figure as a base64 PNG, for ``<img src='data:image/png;base64,...'>`` (no external files)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
