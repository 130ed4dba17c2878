"""Real re-id embeddings of phantom frames for the audit benchmark, rendered and encoded once (cached).

Frames: the phantom generator (`echoflow.data.phantom`) renders each site's patients in memory (4 sites, each with
its own scanner style; 2-4 visits × 32 frames per patient). Models: the demo-size VAE, randomly initialised with
a fixed seed (its latent scale measured on the frames, as in training), and the demo-size re-id encoder trained
for ``reid_steps`` InfoNCE steps on the TRAIN patients' latent frames (the stage's own loss; 0 = as
initialised). No download.

- **real**: TRAIN frames of ``patients`` patients per site (every frame of every visit).
- **heldout**: every frame of 10 further patients per site (calibration of τ).
- **generated**: frames of new patients rendered in the sites' styles (a generator's output looks like a new
  patient of a known site), plus 1 % *memorised copies*: real TRAIN visits re-rendered with fresh speckle and
  noise (same anatomy, same beat), the kind of sample the audit exists to withhold.

To reach a larger real set, `mixture_fill` draws the rest from a Gaussian mixture fitted to each site's real
embeddings: k-means components (64 per site), each a full-covariance Gaussian of its members, points drawn
i.i.d. and put back on the unit sphere. The draws carry no within-video near-duplicates, so they are spread
wider than real frames.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
import torch

from echoflow.config import load_config, plain
from echoflow.data.phantom import (
    _ANATOMY,
    _STYLE,
    _VISIT,
    render_video,
    sample_anatomy,
    sample_patient_ef,
    sample_visit,
    stream_rng,
)
from echoflow.data.phantom_look import sample_site_style
from echoflow.models.vae import AdversarialVAE, measure_latent_scale
from echoflow.stages.networks import build_network
from echoflow.stages.objectives import build_stage

CACHE = Path(__file__).resolve().parents[1] / "runs" / "bench_cache"
HELDOUT_PATIENTS = 10
COPY_SHARE = 0.01


@dataclass(frozen=True)
class ReidCohort:
    """Re-id embeddings (unit vectors, float32) of phantom frames.

    Attributes:
        real: site name -> (N_s, 128) TRAIN frame embeddings (video-major, frame order).
        heldout: site name -> (H_s, 128) held-out patients' frame embeddings.
        generated: (G, 128) new patients' frames, the memorised copies first.
        copies: number of memorised-copy rows at the top of ``generated``.
    """

    real: dict[str, np.ndarray]
    heldout: dict[str, np.ndarray]
    generated: np.ndarray
    copies: int


def _patient_videos(seed: int, site: int, patient: int, *, noise_stream: int = 0) -> list[np.ndarray]:
    """All visits of one phantom patient, (32, 64, 64) uint8 each; ``noise_stream`` > 0 redraws speckle/noise."""
    style = sample_site_style(stream_rng(seed, _STYLE, site))
    rng = stream_rng(seed, _ANATOMY, site, patient)
    anatomy, patient_ef, visits = sample_anatomy(rng), sample_patient_ef(rng), int(rng.integers(2, 5))
    videos = []
    for index in range(visits):
        rng = stream_rng(seed, _VISIT, site, patient, index)
        visit = sample_visit(rng, patient_ef=patient_ef, frames=32)
        noise = rng if noise_stream == 0 else np.random.default_rng([seed, 99, site, patient, index, noise_stream])
        videos.append(render_video(anatomy, visit, style, rng=noise).frames)
    return videos


def _vae(frames: np.ndarray) -> AdversarialVAE:
    cfg = load_config()
    torch.manual_seed(0)
    vae = build_network("vae", plain(cfg.model)).eval()
    assert isinstance(vae, AdversarialVAE)
    measure_latent_scale(vae, torch.from_numpy(frames[:2048]).float()[:, None] / 127.5 - 1)
    return vae


@torch.no_grad()
def _encode(vae: AdversarialVAE, frames: np.ndarray) -> np.ndarray:
    """(N, 64, 64) uint8 -> (N, 4, 16, 16) float32 scaled latent means."""
    out = [vae.encode_latent(torch.from_numpy(frames[i : i + 256]).float()[:, None] / 127.5 - 1).numpy()
           for i in range(0, len(frames), 256)]
    return np.concatenate(out).astype(np.float32)


def _cohort_latents(sites: int, patients: int, generated: int, seed: int) -> dict[str, np.ndarray]:
    """Render and VAE-encode every frame once (cached): latents and the patient of each frame, per group."""
    key = hashlib.sha256(f"{sites}-{patients}-{generated}-{seed}-latents-v1".encode()).hexdigest()[:12]
    path = CACHE / f"reid_latents_{key}.npz"
    if path.is_file():
        return dict(np.load(path))
    start = time.perf_counter()
    groups: dict[str, list[tuple[int, np.ndarray]]] = {}
    for site in range(sites):
        name = f"site_{site:02d}"
        groups[f"real_{name}"] = [(site * 10_000 + p, v) for p in range(patients)
                                  for v in _patient_videos(seed, site, p)]
        groups[f"heldout_{name}"] = [(site * 10_000 + p, v) for p in range(patients, patients + HELDOUT_PATIENTS)
                                     for v in _patient_videos(seed, site, p)]
    copies = max(1, int(generated * COPY_SHARE))
    rng = np.random.default_rng(seed)
    memorised: list[tuple[int, np.ndarray]] = []
    while sum(len(v) for _, v in memorised) < copies:  # whole re-rendered visits of random TRAIN patients
        site, patient = int(rng.integers(sites)), int(rng.integers(patients))
        memorised += [(site * 10_000 + patient, v) for v in _patient_videos(seed, site, patient, noise_stream=1)]
    fresh: list[tuple[int, np.ndarray]] = []
    patient = patients + HELDOUT_PATIENTS
    while sum(len(v) for _, v in fresh) < generated - copies:  # new patients, in turn at each site's style
        fresh += [(patient, v) for v in _patient_videos(seed, patient % sites, patient)]
        patient += 1
    frames = {name: np.concatenate([v for _, v in videos]) for name, videos in groups.items()}
    owners = {f"patient_{name}": np.concatenate([np.full(len(v), p) for p, v in videos])
              for name, videos in groups.items()}
    frames["generated"] = np.concatenate([np.concatenate([v for _, v in memorised])[:copies],
                                          np.concatenate([v for _, v in fresh])])[:generated]
    vae = _vae(frames["real_site_00"])
    out = {name: _encode(vae, x) for name, x in frames.items()} | owners | {"copies": np.array(copies)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **cast(dict[str, Any], out))
    print(f"rendered and VAE-encoded {sum(len(x) for x in frames.values()):,} phantom frames in "
          f"{time.perf_counter() - start:.0f} s (cached: {path})")
    return out


def _train_reid(latents: np.ndarray, patient: np.ndarray, *, steps: int, seed: int) -> torch.nn.Module:
    """The demo re-id encoder after ``steps`` InfoNCE steps on pairs of one TRAIN patient's latent frames."""
    cfg = load_config()
    torch.manual_seed(seed)
    stage = build_stage("reid", plain(cfg.model), plain(cfg.train.reid.loss))
    encoder = stage.groups()["model"]
    if steps == 0:
        return encoder.eval()
    optimiser = torch.optim.AdamW(encoder.parameters(), lr=float(cfg.train.reid.optim.lr))
    rng = np.random.default_rng(seed)
    ids = np.unique(patient)
    rows = [np.flatnonzero(patient == i) for i in ids]
    batch = int(cfg.train.reid.optim.batch_size)
    z = torch.from_numpy(latents)
    encoder.train()
    for step in range(steps):
        who = rng.choice(len(ids), batch, replace=False)
        a = [int(rng.choice(rows[w])) for w in who]
        b = [int(rng.choice(rows[w])) for w in who]
        loss, _ = stage.loss("model", {"a": z[a], "b": z[b], "patient": torch.from_numpy(who)}, step=step)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return encoder.eval()


def reid_cohort(*, sites: int = 4, patients: int = 50, generated: int = 10_000, seed: int = 0,
                reid_steps: int = 300) -> ReidCohort:
    """Re-id embeddings of the rendered cohort (rendering and VAE encoding cached in ``runs/bench_cache``)."""
    key = hashlib.sha256(f"{sites}-{patients}-{generated}-{seed}-{reid_steps}-emb-v1".encode()).hexdigest()[:12]
    path = CACHE / f"reid_embeddings_{key}.npz"
    names = [f"site_{s:02d}" for s in range(sites)]
    if not path.is_file():
        data = _cohort_latents(sites, patients, generated, seed)
        encoder = _train_reid(np.concatenate([data[f"real_{n}"] for n in names]),
                              np.concatenate([data[f"patient_real_{n}"] for n in names]), steps=reid_steps, seed=seed)

        @torch.no_grad()
        def embed(z: np.ndarray) -> np.ndarray:
            return np.concatenate([encoder(torch.from_numpy(z[i : i + 512])).numpy() for i in range(0, len(z), 512)])

        groups = [f"real_{n}" for n in names] + [f"heldout_{n}" for n in names] + ["generated"]
        embedded: dict[str, Any] = {g: embed(data[g]).astype(np.float32) for g in groups}
        np.savez(path, copies=data["copies"], **embedded)
    data = dict(np.load(path))
    return ReidCohort({n: data[f"real_{n}"] for n in names}, {n: data[f"heldout_{n}"] for n in names},
                      data["generated"], int(data["copies"]))


def mixture_fill(real: np.ndarray, n: int, *, components: int = 64, seed: int = 0) -> np.ndarray:
    """(n, D) unit vectors drawn from a full-covariance Gaussian mixture fitted to ``real`` (see module doc)."""
    if n <= 0:
        return np.zeros((0, real.shape[1]), dtype=np.float32)
    rng = np.random.default_rng(seed)
    kmeans = faiss.Kmeans(real.shape[1], components, niter=20, seed=seed, verbose=False)
    kmeans.train(real)
    assign = kmeans.index.search(real, 1)[1][:, 0]
    weights = np.bincount(assign, minlength=components) / len(real)
    counts = rng.multinomial(n, weights)
    out = []
    for k in np.flatnonzero(counts):
        members = real[assign == k].astype(np.float64)
        mean = members.mean(0)
        cov = np.cov(members, rowvar=False) if len(members) > 1 else np.zeros((real.shape[1],) * 2)
        out.append(rng.multivariate_normal(mean, cov + 1e-8 * np.eye(len(mean)), size=counts[k], method="eigh"))
    x = np.concatenate(out)[rng.permutation(n)]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
