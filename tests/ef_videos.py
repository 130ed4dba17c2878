"""Test support: small phantom echo videos labelled with chosen EFs, written as an EchoNet-layout cohort folder."""

from pathlib import Path

import numpy as np

from echoflow.data.echonet import VideoRecord, write_avi, write_filelist
from echoflow.data.phantom import render_video, sample_visit
from echoflow.data.phantom_anatomy import sample_anatomy
from echoflow.data.phantom_look import sample_site_style

FPS = 25.0


def write_ef_videos(root: Path, efs: list[float], *, site: str, size: int = 64, frames: int = 32,
                    seed: int = 0) -> list[VideoRecord]:
    """One phantom video per EF (labelled with that EF, TRAIN split) under ``root``; returns the FileList rows."""
    rng = np.random.default_rng(seed)
    style = sample_site_style(rng)
    records = []
    for i, ef in enumerate(efs):
        video = render_video(sample_anatomy(rng), sample_visit(rng, patient_ef=ef, frames=frames), style, size=size,
                             frames=frames, rng=rng).frames
        name = f"{site}V{i:03d}"
        write_avi(root / "Videos" / f"{name}.avi", video, FPS)
        records.append(VideoRecord(name, root / "Videos" / f"{name}.avi", ef, float("nan"), float("nan"), FPS,
                                   frames, size, size, "TRAIN", name, site))
    write_filelist(root, records)
    return records
