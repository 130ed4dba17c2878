"""`echoflow export echonet|dicom SRC --out DST`: a released folder in formats other tools read."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from echoflow.data.export import ExportResult

export_app = typer.Typer(help="Export a released dataset folder (EchoNet layout) for other tools.",
                         no_args_is_help=True)

SRC = typer.Argument(help="Released folder, EchoNet layout (e.g. <audit out>/released).")


def _print(result: ExportResult, what: str, out: Path) -> None:
    for line in result.skipped:
        typer.echo(line)
    typer.echo(f"{result.summary(what)} -> {out}")


@export_app.command("echonet")
def echonet(
    src: Annotated[Path, SRC],
    out: Annotated[Path, typer.Option("--out", help="Output folder for EchoNet-Dynamic's own loader.")],
) -> None:
    """EchoNet-Dynamic layout their `echonet.datasets.Echo` loads unchanged (placeholder tracings: EF only)."""
    from echoflow.data.export import export_echonet

    _print(export_echonet(src, out), "videos", out)


@export_app.command("dicom")
def dicom(
    src: Annotated[Path, SRC],
    out: Annotated[Path, typer.Option("--out", help="Output folder, one .dcm per video.")],
) -> None:
    """Ultrasound Multi-frame DICOM (MONOCHROME2, 8-bit), marked synthetic, fresh UIDs, EF in ImageComments."""
    from echoflow.data.export import export_dicom

    _print(export_dicom(src, out), "DICOM files", out)
