"""`echoflow data ...`: build the phantom cohort, ingest DICOM, summarise a cohort."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(help="Get echo videos in: generate the phantom cohort, ingest DICOM, inspect a cohort.",
                       no_args_is_help=True)


@data_app.command("ingest")
def ingest(
    dicom_dir: Annotated[Path, typer.Argument(help="Folder of ultrasound DICOM files (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", help="Output site folder, EchoNet layout (its name = site).")],
    ef_csv: Annotated[Path | None, typer.Option("--ef-csv", help="CSV: EF + SOPInstanceUID or FileName.")] = None,
    size: Annotated[int, typer.Option("--size", min=8, help="Output frame height = width, pixels.")] = 112,
    salt: Annotated[str | None, typer.Option(
        "--salt", envvar="ECHOFLOW_SALT", help="Secret hash salt; reuse it so a patient's studies link across runs.",
    )] = None,
) -> None:
    """De-identify ultrasound DICOM into Videos/*.avi + FileList.csv; print one line per skipped file."""
    import secrets

    from echoflow.data.dicom import ingest_dicom  # lazy: keeps `echoflow --help` free of torch

    if salt is None:
        salt = secrets.token_hex(16)
        typer.echo("no --salt given: used a one-off random salt, so these patients will not link to other ingests")
    report = ingest_dicom(dicom_dir, out, salt=salt, size=size, ef_csv=ef_csv)
    for line in report.skipped:
        typer.echo(line)
    typer.echo(report.summary())


@data_app.command("summary")
def summary(dirs: Annotated[list[Path], typer.Argument(help="One or more site folders (EchoNet layout).")]) -> None:
    """Per site: videos and patients per split, EF statistics, and every problem row."""
    import math
    from collections import Counter

    from echoflow.data.echonet import SPLITS, read_cohort

    for root in dirs:
        cohort = read_cohort(root, require_ef=False)
        records = cohort.records
        splits = Counter(r.split for r in records)
        patients = {split: len({r.patient_id for r in records if r.split == split}) for split in SPLITS}
        counts = ", ".join(f"{s} {splits[s]} videos/{patients[s]} patients" for s in SPLITS)
        typer.echo(f"{root.resolve().name}: {len(records)} videos ({counts})")
        efs = [r.ef for r in records if not math.isnan(r.ef)]
        if efs:
            mean = sum(efs) / len(efs)
            sd = math.sqrt(sum((ef - mean) ** 2 for ef in efs) / len(efs))
            typer.echo(f"  EF %: mean {mean:.1f}, sd {sd:.1f}, min {min(efs):.1f}, max {max(efs):.1f}"
                       f"; unknown {len(records) - len(efs)}")
        else:
            typer.echo("  EF %: unknown for every video")
        typer.echo(f"  problems: {len(cohort.problems)}")
        for line in cohort.problems:
            typer.echo(f"    {line}")
