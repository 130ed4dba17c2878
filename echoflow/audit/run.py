"""One audit end to end: embed -> per-site index -> calibrate -> canaries -> decide -> release -> report.

The unit of decision is a frame: every ``every``-th frame of each generated video is a sample, and a video is
withheld if ANY of its audited frames reaches τ. Canaries are planted among the frames unknown to the decision
and never map to a file. A video file reaches ``<out>/released/`` only through `release_videos` (in
`echoflow.audit.release`), which copies a file only when the SHA-256 of its bytes belongs to a video whose audit
record passed.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn

from echoflow.audit.calibrate import Calibration, calibrate
from echoflow.audit.canaries import TRANSFORMS, CanaryPlan, plant_canaries
from echoflow.audit.decide import AuditResult, decide_samples
from echoflow.audit.embed import RealSite, embed_pixels, embed_videos, frame_batch, pick_frames, video_frames
from echoflow.audit.federated import (
    InProcessTransport,
    RemoteSite,
    SiteAuditor,
    Transport,
    remote_calibration,
    serve_simulation,
)
from echoflow.audit.index import IndexKind, build_index
from echoflow.audit.neighbours import Similarity, SiteSearcher, threshold_recall
from echoflow.audit.release import VideoDecision, decide_videos, nearest_real, read_generated, release_videos
from echoflow.audit.report import build_report, write_report
from echoflow.data.echonet import VideoRecord
from echoflow.data.sites import SiteData
from echoflow.errors import EchoFlowError
from echoflow.models.vae import AdversarialVAE
from echoflow.progress import progress_bar

CHOICES = {"mode": ("local", "federated"), "transport": ("flower", "inprocess"), "real_frames": ("all", "first"),
           "scope": ("global", "site")}


@dataclass(frozen=True)
class AuditSettings:
    """The ``audit`` config group (``configs/audit/default.yaml`` documents every key)."""

    mode: Literal["local", "federated"] = "local"
    transport: Literal["flower", "inprocess"] = "flower"
    every: int = 1
    real_frames: Literal["all", "first"] = "all"
    similarity: Similarity = "cosine"
    index: IndexKind = "auto"
    percentile: float = 95.0
    scope: Literal["global", "site"] = "global"
    canaries: int = 0
    transforms: tuple[str, ...] = tuple(TRANSFORMS)
    timeout_s: float = 600.0
    pairs: int = 6
    seed: int = 0

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> AuditSettings:
        """Check and convert a plain ``audit`` config mapping."""
        values = dict(node)
        if unknown := sorted(set(values) - set(cls.__dataclass_fields__)):
            raise EchoFlowError(f"audit: unknown key(s) {unknown}")
        for key, allowed in CHOICES.items():
            if key in values and values[key] not in allowed:
                raise EchoFlowError(f"audit.{key}: expected one of {allowed}, got {values[key]!r}")
        if "transforms" in values:
            values["transforms"] = tuple(values["transforms"])
        return cls(**values)


def embed_sites(vae: AdversarialVAE, reid: nn.Module, train: Sequence[SiteData], heldout: Sequence[SiteData],
                settings: AuditSettings) -> dict[str, RealSite]:
    """Embed every site's TRAIN frames (all, or first frames) and held-out frames (every ``settings.every``-th)."""
    by_name = {site.name: site for site in heldout}
    out = {}
    for site in train:
        names = [record.file_name for record in site.records]
        held = by_name[site.name]
        out[site.name] = RealSite(
            train=embed_videos(vae, reid, site.videos, names, first_only=settings.real_frames == "first",
                               description=f"embed {site.name} TRAIN videos"),
            heldout=embed_videos(vae, reid, held.videos, [r.file_name for r in held.records], every=settings.every,
                                 description=f"embed {site.name} held-out videos").vectors,
            videos=site.videos,
        )
    return out


def _failed(g: int, sites: Sequence[str], reason: str) -> AuditResult:
    """The result of an audit whose calibration failed: nothing is releasable."""
    return AuditResult(release=np.zeros(g, dtype=bool), site=np.full(g, "", dtype=object), real_id=np.full(g, -1),
                       similarity=np.full(g, np.nan, np.float32), threshold=np.full(g, np.nan, np.float32),
                       exact=np.zeros(g, dtype=bool), failures={"calibration": reason}, sites=tuple(sites),
                       thresholds=dict.fromkeys(sites, 1.0))


def ask_sites(sites: Mapping[str, SiteSearcher], calibration: Callable[[], Calibration], queries: np.ndarray,
              settings: AuditSettings) -> tuple[Calibration, AuditResult]:
    """Calibrate τ, then decide; a site failing either step fails the audit closed."""
    try:
        cal = calibration()
    except Exception as error:  # whatever a site raised, nothing may be released
        uncalibrated = Calibration(settings.percentile, dict.fromkeys(sites, 1.0), 1.0, {}, np.zeros(0, np.float32))
        return uncalibrated, _failed(len(queries), list(sites), f"{type(error).__name__}: {error}")
    return cal, decide_samples(queries, sites, cal.thresholds(settings.scope), timeout_s=settings.timeout_s)


def index_and_decide(real: Mapping[str, RealSite], queries: np.ndarray, settings: AuditSettings,
           index_dir: Path) -> tuple[Calibration, AuditResult, dict[str, dict[str, Any]]]:
    """Index each site (saved as ``<index_dir>/<site>/``), then calibrate and decide, locally or federated."""
    folders, auditors = {}, {}
    with progress_bar("index sites", total=len(real)) as advance:
        for name, site in real.items():
            index = build_index(site.train.vectors, kind=settings.index, similarity=settings.similarity,
                                seed=settings.seed)
            auditors[name] = SiteAuditor(name, index, site.heldout)
            folders[name] = index_dir / name
            auditors[name].save(folders[name])
            advance(1)
    info: dict[str, dict[str, Any]] = {n: {"index": a.index.kind, "ntotal": a.index.ntotal}
                                       for n, a in auditors.items()}
    if settings.mode == "local":
        indexes = {n: a.index for n, a in auditors.items()}
        heldout = {n: a.heldout for n, a in auditors.items()}
        cal, result = ask_sites(indexes, lambda: calibrate(indexes, heldout, percentile=settings.percentile,
                                                           timeout_s=settings.timeout_s), queries, settings)
        if not result.failed:
            for n, a in auditors.items():
                info[n]["threshold_recall"] = threshold_recall(a.index, queries, threshold=result.thresholds[n])
        return cal, result, info

    def job(transport: Transport) -> tuple[Calibration, AuditResult]:
        remote = {n: RemoteSite(n, transport, settings.timeout_s) for n in folders}
        return ask_sites(remote, lambda: remote_calibration(list(remote.values()), percentile=settings.percentile),
                         queries, settings)

    if settings.transport == "flower":
        cal, result = serve_simulation(folders, job, timeout_s=settings.timeout_s)
    else:
        cal, result = job(InProcessTransport.of_folders(folders))
    return cal, result, info


@dataclass(frozen=True)
class AuditOutcome:
    """What `run_audit` did: the report (also on disk), the per-video decisions, the released records."""

    report: dict[str, Any]
    paths: tuple[Path, Path]
    result: AuditResult
    plan: CanaryPlan
    decisions: list[VideoDecision]
    released: list[VideoRecord]


def canary_pool(real: Mapping[str, RealSite], n: int, *, seed: int) -> np.ndarray:
    """``n`` random indexed real TRAIN frames across all sites, (n, 1, H, W) in [-1, 1]."""
    rows = [(name, row) for name, site in real.items() for row in range(len(site.train.vectors))]
    picks = np.random.default_rng(seed + 1).choice(len(rows), size=min(n, len(rows)), replace=False)
    frames = []
    for i in picks:
        name, row = rows[int(i)]
        refs = real[name].train.refs
        frames.append(real[name].videos[int(refs.video[row])][int(refs.frame[row])])
    size = next(iter(real.values())).videos[0].shape[1:]
    return frame_batch(np.stack(frames)) if frames else np.zeros((0, 1, *size), np.float32)


def run_audit(*, vae: AdversarialVAE, reid: nn.Module, train: Sequence[SiteData], heldout: Sequence[SiteData],
              generated_dir: Path, out: Path, index_dir: Path, settings: AuditSettings,
              real: Mapping[str, RealSite] | None = None) -> AuditOutcome:
    """Audit the videos in ``generated_dir`` against every site; write ``out/{audit.json,audit.html,released/}``.

    Args:
        vae: trained VAE (generated and real pixels are encoded by it).
        reid: trained re-id encoder.
        train: each site's TRAIN pixel videos (the real data a copy would come from).
        heldout: each site's VAL + TEST pixel videos (calibration), same site names.
        generated_dir: EchoNet-layout folder of generated videos.
        out: output folder; a previous ``released/`` there is removed first.
        index_dir: per-site index folders are saved here (``<index_dir>/<site>/``).
        settings: the ``audit`` config group.
        real: `embed_sites` of ``train`` and ``heldout`` under ``settings``, when the caller has it already.
    """
    start = time.perf_counter()
    shutil.rmtree(out / "released", ignore_errors=True)  # a stale release must never outlive a new audit
    with progress_bar("audit (embed real, embed generated, decide, release)", total=4) as advance:
        real = embed_sites(vae, reid, train, heldout, settings) if real is None else real
        advance(1)
        generated = read_generated(generated_dir, size=int(train[0].videos[0].shape[-1]))
        video, frame = pick_frames([len(v) for v in generated.videos], every=settings.every)
        frames = video_frames(generated.videos, video, frame)
        mixed, plan = plant_canaries(frames, canary_pool(real, settings.canaries, seed=settings.seed),
                                     n=settings.canaries, transforms=settings.transforms, seed=settings.seed)
        queries = embed_pixels(vae, reid, mixed)
        advance(1)
        calibration, result, info = index_and_decide(real, queries, settings, index_dir)
        advance(1)
        genuine = plan.generated_mask()
        decisions = decide_videos(replace(result, **{k: getattr(result, k)[genuine] for k in
                                                     ("release", "site", "real_id", "similarity", "threshold")}),
                                  video, generated, real)
        released = [] if result.failed else release_videos(generated, decisions, out / "released")
        advance(1)
    report = build_report(result, calibration, index_info=info,
                          canaries=plan.score(~result.release) if settings.canaries else None, genuine=genuine,
                          videos=[(d.release, d.frames, len(v)) for d, v in zip(decisions, generated.videos,
                                                                                 strict=True)],
                          every=settings.every)
    row_of = np.cumsum(genuine) - 1
    for i, sample in enumerate(report["samples"]):
        real_video, real_frame = nearest_real(real, sample["site"], sample["real_id"])
        sample |= {"canary": not genuine[i], "real_video": real_video, "real_frame": real_frame,
                   "video": generated.records[video[row_of[i]]].file_name if genuine[i] else None,
                   "frame": int(frame[row_of[i]]) if genuine[i] else None}
    report["videos"] = [vars(d) for d in decisions]
    report["run"] = {"mode": settings.mode, "generated_dir": str(generated_dir), "index_dir": str(index_dir),
                     "every": settings.every, "real_frames": settings.real_frames, "similarity": settings.similarity,
                     "problems": generated.problems, "seconds": time.perf_counter() - start}
    local = settings.mode == "local"  # a federated audit's real frames stay at their sites: none on the page
    pairs = _pairs(result, genuine, mixed, real, settings.pairs) if local and not result.failed else []
    paths = write_report(report, calibration, result, out, pairs=pairs, generated_videos=generated.records,
                         real_videos=[r for site in train for r in site.records if local])
    return AuditOutcome(report, paths, result, plan, decisions, released)


def _pairs(result: AuditResult, genuine: np.ndarray, mixed: np.ndarray, real: Mapping[str, RealSite],
           n: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """The ``n`` genuine generated frames closest to τ, each beside its nearest real frame (local mode only)."""
    margin = np.where(genuine, result.similarity - result.threshold, -np.inf)
    pairs = []
    for row in np.argsort(-margin)[: min(n, int(genuine.sum()))]:
        site, real_id = str(result.site[row]), int(result.real_id[row])
        refs = real[site].train.refs
        real_frame = frame_batch(real[site].videos[int(refs.video[real_id])][None, int(refs.frame[real_id])])[0]
        verdict = "released" if result.release[row] else "withheld"
        pairs.append((mixed[row], real_frame, f"#{row} {verdict}: {site} sim {result.similarity[row]:.3f}"))
    return pairs
