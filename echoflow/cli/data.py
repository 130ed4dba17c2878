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
        "--salt", envvar="ECHOFLOW_SALT",
        help="Site secret (>= 16 bytes) keying the HMAC pseudonyms; reuse it so a patient's studies link across "
             "runs. Without it a random key is used.",
    )] = None,
    accept_burned_in_risk: Annotated[bool, typer.Option(
        "--accept-burned-in-risk",
        help="Also ingest single frames and low-motion cines, whose burned-in text cannot be told from the image "
             "(only flat bright text is removed from them). The site accepts that risk; refused without it.",
    )] = False,
) -> None:
    """De-identify ultrasound DICOM into Videos/*.avi + FileList.csv; print one line per skipped input."""
    from echoflow.data.ingest import ingest_dicom  # lazy: keeps `echoflow --help` free of torch

    report = ingest_dicom(dicom_dir, out, salt=salt, size=size, ef_csv=ef_csv,
                          accept_burned_in_risk=accept_burned_in_risk)
    for line in [*report.notes, *report.skipped]:
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


@data_app.command("phantom")
def phantom(
    out: Annotated[Path, typer.Option("--out", help="Output folder; one EchoNet-layout folder per site inside.")],
    sites: Annotated[int, typer.Option("--sites", min=1, help="Hospital sites (scanner styles).")] = 4,
    patients_per_site: Annotated[int, typer.Option("--patients-per-site", min=1, help="Patients per site.")] = 40,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Same seed -> identical cohort.")] = 0,
    size: Annotated[int, typer.Option("--size", min=16, help="Frame height = width, pixels.")] = 64,
    frames: Annotated[int, typer.Option("--frames", min=10, help="Frames per video (25 fps).")] = 32,
) -> None:
    """Generate the synthetic A4C phantom cohort (patients with 2-4 visits of known EF) and summarise it."""
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from echoflow.data.echonet import SPLITS
    from echoflow.data.phantom import generate_cohort

    folders = generate_cohort(out, sites=sites, patients_per_site=patients_per_site, seed=seed, size=size,
                              frames=frames)
    table = Table(title=f"Phantom A4C cohort (seed {seed}, {size}x{size}, {frames} frames at 25 fps)",
                  caption=f"written to {out.resolve()}/site_XX")
    for column in ("site", "patients", "videos", *(f"{split} EF % (n)" for split in SPLITS)):
        table.add_column(column)
    for folder in folders:
        rows = pd.read_csv(folder / "FileList.csv")
        by_split = [rows.EF[rows.Split == split] for split in SPLITS]
        table.add_row(folder.name, str(rows.PatientID.nunique()), str(len(rows)),
                      *(f"{ef.mean():.1f} ± {ef.std(ddof=0):.1f} ({len(ef)})" if len(ef) else "-"
                        for ef in by_split))
    Console().print(table)
