"""Release of audited videos, fail-closed: the per-video decisions and the copy into ``released/``.

A generated video is released only if every one of its audited frames was (`decide_videos`); a failed audit
releases nothing. `release_videos` is the only writer of ``released/``: it copies a file only when the SHA-256 of
the bytes it reads at copy time is that of a video whose audit record passed, so a file swapped or edited after
its audit, or never audited, is not released. The audit itself (embed, index, calibrate, decide, report) is
`echoflow.audit.run`.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from echoflow.audit.decide import AuditResult
from echoflow.audit.embed import RealSite
from echoflow.data.echonet import VideoRecord, load_video, read_cohort, write_filelist
from echoflow.errors import EchoFlowError


@dataclass(frozen=True)
class Generated:
    """The generated videos as audited: FileList records, SHA-256 of each file's bytes, decoded pixels."""

    records: list[VideoRecord]
    sha256: list[str]
    videos: list[np.ndarray]
    problems: list[str]


def read_generated(folder: Path, *, size: int) -> Generated:
    """Read an EchoNet-layout folder of generated videos; undecodable rows become problems (never released).

    Each file is read ONCE: the pixels audited are decoded from exactly the bytes whose SHA-256 is recorded.
    """
    cohort = read_cohort(folder, require_ef=False)
    records, digests, videos, problems = [], [], [], list(cohort.problems)
    for record in cohort.records:
        try:
            data = record.path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            videos.append(decode_bytes(data, record.path, size=size))
        except EchoFlowError as err:
            problems.append(str(err))
            continue
        records.append(record)
        digests.append(digest)
    if not records:
        raise EchoFlowError(f"{folder}: no decodable generated video")
    return Generated(records, digests, videos, problems)


def decode_bytes(data: bytes, path: Path, *, size: int) -> np.ndarray:
    """Decode the AVI ``data`` (read from ``path``) via a private temporary copy; errors name ``path``."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "video.avi"
        copy.write_bytes(data)
        try:
            return load_video(copy, size=size)
        except EchoFlowError as err:
            raise EchoFlowError(str(err).replace(str(copy), str(path))) from err


@dataclass(frozen=True)
class VideoDecision:
    """The decision for one generated video, from its closest audited frame (largest similarity − τ)."""

    file_name: str
    sha256: str
    release: bool
    site: str
    real_id: int
    real_video: str | None
    real_frame: int | None
    similarity: float | None
    threshold: float | None
    frames: int


def nearest_real(real: Mapping[str, RealSite], site: str, real_id: int) -> tuple[str | None, int | None]:
    """(real video file name, frame) of TRAIN row ``real_id`` at ``site``; (None, None) when there is none."""
    if site not in real or real_id < 0:
        return None, None
    return real[site].train.refs.name(real_id)


def decide_videos(result: AuditResult, video_of_row: np.ndarray, generated: Generated,
                  real: Mapping[str, RealSite]) -> list[VideoDecision]:
    """Per video: released only if every audited frame was (``video_of_row``: (G,) video per generated row)."""
    margin = np.nan_to_num(result.similarity - result.threshold, nan=-np.inf)
    decisions = []
    for v, record in enumerate(generated.records):
        rows = np.flatnonzero(video_of_row == v)
        row = int(rows[np.argmax(margin[rows])])
        site, real_id = str(result.site[row]), int(result.real_id[row])
        finite = bool(np.isfinite(result.similarity[row]))
        decisions.append(VideoDecision(
            record.file_name, generated.sha256[v], bool(result.release[rows].all()) and not result.failed, site,
            real_id, *nearest_real(real, site, real_id),
            float(result.similarity[row]) if finite else None, float(result.threshold[row]) if finite else None,
            len(rows)))
    return decisions


def release_videos(generated: Generated, decisions: Sequence[VideoDecision], out: Path) -> list[VideoRecord]:
    """Copy the passing videos' bytes into ``out`` (EchoNet layout). The only way anything is released.

    A file is copied only when the SHA-256 of the bytes read now is that of a video whose audit record passed
    (a file changed since it was audited is not). Written to a staging folder that becomes ``out`` at the end.
    """
    passed = {d.sha256: d.file_name for d in decisions if d.release}
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "Videos").mkdir(parents=True)
    released = []
    for record in generated.records:
        data = record.path.read_bytes()
        if passed.get(hashlib.sha256(data).hexdigest()) != record.file_name:
            continue
        target = out / "Videos" / f"{record.file_name}.avi"
        (staging / "Videos" / target.name).write_bytes(data)
        released.append(replace(record, path=target))
    write_filelist(staging, released)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return released
