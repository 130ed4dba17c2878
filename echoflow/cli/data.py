"""`echoflow data ...`: build the phantom cohort, ingest DICOM, summarise a cohort."""

from __future__ import annotations

import typer

data_app = typer.Typer(help="Get echo videos in: generate the phantom cohort, ingest DICOM, inspect a cohort.",
                       no_args_is_help=True)
