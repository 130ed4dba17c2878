"""Sites as the models see them: each site's videos in memory, torch Datasets of frames, clips and pairs.

Phantom and demo cohorts are small, so every video is decoded once, resized, and kept as uint8. Labels are
global: ``site`` is the site's position in ``load_sites``' list, ``patient`` an index into one patient table
shared by all sites (keyed by ``PatientID``), ``video`` a position in the concatenation of all sites' videos.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from echoflow.data.echonet import VideoRecord, load_video, read_cohort
from echoflow.data.intensity import to_unit
from echoflow.errors import EchoFlowError

Item = dict[str, torch.Tensor]


Decoded = dict[tuple[Path, int], np.ndarray]
"""Videos decoded in this process, by (file, size): see `load_sites`."""


@dataclass
class SiteData:
    """One site's videos, decoded.

    Attributes:
        name: site name (its folder name). ``index``: its position among the loaded sites.
        records: FileList rows whose videos decoded, aligned with ``videos``.
        videos: (T, H, W) uint8 pixel arrays at the configured size; T varies per video. Sites encoded by the
            VAE hold (T, C, h, w) float32 latents instead, and every dataset then yields latents
            (frame (C, h, w), clip (C, T, h, w), pair a/b (C, h, w)) in place of pixels.
        patient_index: ``PatientID`` -> int, shared by every site loaded together.
        first_video: global index of ``videos[0]`` across the loaded sites.
        problems: one line per skipped row or undecodable video.
    """

    name: str
    records: list[VideoRecord]
    videos: list[np.ndarray]
    patient_index: dict[str, int]
    index: int = 0
    first_video: int = 0
    problems: list[str] = field(default_factory=list)


def load_site(root: Path, *, size: int, splits: Sequence[str] = ("TRAIN",), require_ef: bool = True,
              decoded: Decoded | None = None) -> SiteData:
    """Decode the videos of ``splits`` in ``root`` to (T, size, size) uint8; bad rows/videos become problems."""
    return load_sites([root], size=size, splits=splits, require_ef=require_ef, decoded=decoded)[0]


def load_sites(
    roots: Sequence[Path], *, size: int, splits: Sequence[str] = ("TRAIN",), require_ef: bool = True,
    decoded: Decoded | None = None,
) -> list[SiteData]:
    """Load several site folders with one global ``patient_index`` and global video numbering.

    ``decoded``: videos already decoded by this process, ``(path, size) -> pixels``; loads through the same
    mapping decode each video once (the pipeline loads the TRAIN split for several steps).

    Raises:
        EchoFlowError: a folder is no dataset, or holds no decodable video in ``splits``.
    """
    wanted = {split.upper() for split in splits}
    patient_index: dict[str, int] = {}
    sites: list[SiteData] = []
    first_video = 0
    for index, root in enumerate(roots):
        cohort = read_cohort(root, require_ef=require_ef)
        site = SiteData(root.resolve().name, [], [], patient_index, index, first_video, list(cohort.problems))
        for record in cohort.records:
            if record.split not in wanted:
                continue
            try:
                site.videos.append(_decode(record.path, size, decoded))
            except EchoFlowError as err:
                site.problems.append(str(err))
                continue
            site.records.append(record)
            patient_index.setdefault(record.patient_id, len(patient_index))
        if not site.videos:
            raise EchoFlowError(f"{root}: no decodable video in splits {'/'.join(sorted(wanted))}")
        sites.append(site)
        first_video += len(site.videos)
    return sites


def _to_unit(frames: np.ndarray) -> torch.Tensor:
    """Model input, channels first.

    uint8 pixels (..., H, W) -> float32 in [-1, 1] with a new channel axis; float latents (..., C, h, w)
    (see ``SiteData.videos``) -> the same values with C moved to the front.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(frames))
    if frames.dtype == np.uint8:
        return to_unit(tensor).unsqueeze(0)
    return tensor.movedim(-3, 0)


def _decode(path: Path, size: int, decoded: Decoded | None) -> np.ndarray:
    if decoded is None:
        return load_video(path, size=size)
    if (path, size) not in decoded:
        decoded[path, size] = load_video(path, size=size)
    return decoded[path, size]


class _Videos:
    """The flat video table shared by the datasets: one entry per video of every site."""

    def __init__(self, sites: Sequence[SiteData]) -> None:
        if not sites:
            raise EchoFlowError("sites: no site given")
        if any(site.patient_index is not sites[0].patient_index for site in sites):
            raise EchoFlowError("sites: load them together with load_sites so patients share one index")
        self.videos = [video for site in sites for video in site.videos]
        rows = [(record.ef, site.patient_index[record.patient_id], site.index, site.first_video + i, record.fps)
                for site in sites for i, record in enumerate(site.records)]
        self.ef = [row[0] for row in rows]
        self.patient = [row[1] for row in rows]
        self.site = [row[2] for row in rows]
        self.video_id = [row[3] for row in rows]
        self.fps = [row[4] for row in rows]

    def labels(self, video: int) -> Item:
        return {
            "ef": torch.tensor(self.ef[video], dtype=torch.float32),
            "patient": torch.tensor(self.patient[video], dtype=torch.int64),
            "site": torch.tensor(self.site[video], dtype=torch.int64),
            "video": torch.tensor(self.video_id[video], dtype=torch.int64),
        }


class FrameDataset(Dataset[Item]):
    """Every frame of every video of the given sites.

    Item fields:
        frame: (1, H, W) float32 in [-1, 1] (pixel / 127.5 - 1).
        ef: () float32, ejection fraction of the frame's video, percent 0-100 (NaN when unknown).
        patient: () int64, global patient index (``SiteData.patient_index``).
        site: () int64, the site's index among the loaded sites.
        video: () int64, global video index.
    """

    def __init__(self, sites: Sequence[SiteData]) -> None:
        self.table = _Videos(sites)
        self.ends = np.cumsum([len(video) for video in self.table.videos])

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, index: int) -> Item:
        video = int(np.searchsorted(self.ends, index, side="right"))
        start = int(self.ends[video - 1]) if video else 0
        return {"frame": _to_unit(self.table.videos[video][index - start]), **self.table.labels(video)}


class ClipDataset(Dataset[Item]):
    """One clip per video: ``frames`` frames at a fixed frame rate ``fps``.

    Each video is subsampled with stride round(video fps / ``fps``) (at least 1), so clips from 25-fps real
    videos and 12.5-fps generated videos show the same time span: with ``frames=16, fps=12.5`` a clip spans
    1.2 s, about one heart cycle. Videos shorter than their clip span are left out (listed in ``skipped``).

    Item fields:
        clip: (1, T, H, W) float32 in [-1, 1] (latent sites: (C, T, h, w)), T = ``frames``.
        ef: () float32, percent 0-100. patient, site, video: () int64 as in ``FrameDataset``.

    Args:
        sites: loaded sites. frames: T. fps: the clips' frame rate, frames per second.
        random_start: draw the first frame uniformly at every access (torch's RNG); else start at 0.
    """

    def __init__(self, sites: Sequence[SiteData], *, frames: int = 16, fps: float = 12.5,
                 random_start: bool = True) -> None:
        self.table = _Videos(sites)
        self.frames, self.random_start = frames, random_start
        self.strides = [max(1, round(video_fps / fps)) for video_fps in self.table.fps]
        spans = [(frames - 1) * stride + 1 for stride in self.strides]
        self.kept = [i for i, video in enumerate(self.table.videos) if len(video) >= spans[i]]
        self.skipped = [i for i, video in enumerate(self.table.videos) if len(video) < spans[i]]
        if not self.kept:
            raise EchoFlowError(f"sites: no video is long enough for {frames} frames at {fps} fps")

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, index: int) -> Item:
        video = self.kept[index]
        pixels, stride = self.table.videos[video], self.strides[video]
        span = (self.frames - 1) * stride + 1
        start = int(torch.randint(len(pixels) - span + 1, ()).item()) if self.random_start else 0
        return {"clip": _to_unit(pixels[start : start + span : stride]), **self.table.labels(video)}


def ef_balance_weights(ef: Sequence[float], *, bin_width: float = 10.0) -> np.ndarray:
    """Sampling weight per video ∝ 1 / (videos in its EF bin), so every occupied bin is drawn equally often.

    Args:
        ef: percent 0-100 per video; NaN (unknown) videos form one bin of their own.
        bin_width: EF bin width, percent (bins [0, w), [w, 2w), ...).

    Returns:
        (N,) float64 weights with mean 1.
    """
    values = np.asarray(ef, dtype=np.float64)
    if values.size == 0 or bin_width <= 0:
        raise EchoFlowError(f"ef_balance_weights: need videos and bin_width > 0 (got {values.size}, {bin_width})")
    bins = np.where(np.isnan(values), -1, np.floor(np.nan_to_num(values) / bin_width)).astype(np.int64)
    _, inverse, counts = np.unique(bins, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    return weights / weights.mean()


def balanced_batches(dataset: ClipDataset, *, batch_size: int, bin_width: float = 10.0) -> Callable[[], Item]:
    """Like ``training.random_batches`` but EF-balanced: clips drawn with replacement, weights `ef_balance_weights`.

    A tail video is then drawn as often as all the videos of a crowded bin together (each draw a new random
    clip phase when ``dataset.random_start``). Not for DP-SGD: a video drawn twice in one batch breaks the
    per-sample accounting, which assumes Poisson sampling of each video at most once.
    """
    weights = torch.from_numpy(ef_balance_weights([dataset.table.ef[v] for v in dataset.kept], bin_width=bin_width))

    def draw() -> Item:
        index = torch.multinomial(weights, batch_size, replacement=True)
        return default_collate([dataset[int(i)] for i in index])

    return draw


class PatientPairDataset(Dataset[Item]):
    """Positive pairs for re-identification: two random frames of one patient, one item per video.

    Frame ``a`` comes from the item's video; ``b`` from another video (visit) of the same patient when the
    patient has one, else from the same video. Items are independent, so Poisson sampling (Opacus) works.

    Item fields:
        a, b: (1, H, W) float32 in [-1, 1].
        patient: () int64, global patient index.
    """

    def __init__(self, sites: Sequence[SiteData]) -> None:
        self.table = _Videos(sites)
        by_patient: dict[int, list[int]] = defaultdict(list)
        for video, patient in enumerate(self.table.patient):
            by_patient[patient].append(video)
        self.others = [[v for v in by_patient[p] if v != video] or [video]
                       for video, p in enumerate(self.table.patient)]

    def __len__(self) -> int:
        return len(self.table.videos)

    def __getitem__(self, index: int) -> Item:
        others = self.others[index]
        partner = others[int(torch.randint(len(others), ()).item())]
        return {"a": self._random_frame(index), "b": self._random_frame(partner),
                "patient": torch.tensor(self.table.patient[index], dtype=torch.int64)}

    def _random_frame(self, video: int) -> torch.Tensor:
        pixels = self.table.videos[video]
        return _to_unit(pixels[int(torch.randint(len(pixels), ()).item())])


def split_sites(
    records: Sequence[VideoRecord], n_sites: int, *, alpha: float | None, seed: int
) -> list[list[VideoRecord]]:
    """Split a pooled cohort into ``n_sites`` sites by patient (a patient's videos stay together).

    Args:
        records: the pooled cohort.
        n_sites: number of sites.
        alpha: None for IID (patients dealt round-robin after a shuffle); else the concentration of the
            Dirichlet(alpha) drawn per EF bin (quintiles of the patients' mean EF) giving each site's share
            of that bin: small alpha (0.1) = very skewed EF per site, large (100) = nearly IID.
        seed: RNG seed.

    Returns:
        One list of records per site, each non-empty, in input order.

    Raises:
        EchoFlowError: fewer patients than sites, or no draw gave every site a patient.
    """
    rng = np.random.default_rng(seed)
    videos: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        videos[record.patient_id].append(i)
    patients = list(videos)
    if len(patients) < n_sites:
        raise EchoFlowError(f"split_sites: {len(patients)} patients cannot fill {n_sites} sites")
    site_of: dict[str, int] = {}
    if alpha is None:
        for rank, p in enumerate(rng.permutation(len(patients))):
            site_of[patients[p]] = rank % n_sites
    else:
        mean_ef = np.array([np.mean([records[i].ef for i in videos[p]]) for p in patients])
        edges = np.nanquantile(mean_ef, [0.2, 0.4, 0.6, 0.8]) if np.isfinite(mean_ef).any() else []
        bins = np.where(np.isnan(mean_ef), len(edges) + 1, np.digitize(mean_ef, edges))
        for _attempt in range(100):
            for b in np.unique(bins):
                members = rng.permutation(np.flatnonzero(bins == b))
                share = rng.dirichlet(np.full(n_sites, alpha))
                cuts = (np.cumsum(share)[:-1] * len(members)).round().astype(int)
                for site, part in enumerate(np.split(members, cuts)):
                    site_of.update({patients[p]: site for p in part})
            if len(set(site_of.values())) == n_sites:
                break
        else:
            raise EchoFlowError(f"split_sites: alpha={alpha} left a site empty in 100 draws; raise alpha")
    return [[r for r in records if site_of[r.patient_id] == site] for site in range(n_sites)]
