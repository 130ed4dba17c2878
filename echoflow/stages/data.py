"""What each stage trains on: a site's pixel videos (vae, ef) or their VAE latents (the latent stages).

Latents are encoded per site (at the site, in the federation): they never mix across sites. The re-id stage
also sees each video's transformed twins (`echoflow.data.intensity.TRANSFORMS`) as more visits of its patient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import Dataset

from echoflow.data.echonet import end_diastolic_frames
from echoflow.data.intensity import TRANSFORMS, to_uint8, to_unit
from echoflow.data.sites import ClipDataset, FrameDataset, PatientPairDataset, SiteData
from echoflow.errors import EchoFlowError
from echoflow.models.vae import AdversarialVAE
from echoflow.progress import progress_bar
from echoflow.stages import LATENT_STAGES
from echoflow.stages.trainer import Batch


@torch.no_grad()
def encode_sites(vae: AdversarialVAE, sites: Sequence[SiteData], *, batch_size: int = 256) -> list[SiteData]:
    """The same sites with every video replaced by its scaled VAE latent means, (T, C, h, w) float32.

    Encoding happens per site, as in the federation: latents never mix across sites.
    """
    vae.eval()
    encoded = []
    with progress_bar("encode videos to latents", total=sum(len(site.videos) for site in sites)) as advance:
        for site in sites:
            latents = []
            for video in site.videos:
                frames = to_unit(video).unsqueeze(1)
                chunks = [vae.encode_latent(chunk) for chunk in frames.split(batch_size)]
                latents.append(torch.cat(chunks).numpy().astype(np.float32))
                advance(1)
            encoded.append(replace(site, videos=latents))
    return encoded


REID_TWINS = ("mirror", "shift", "gain", "speckle")
"""Transforms whose copies of a video count as the same patient when training re-id (the audit's canaries)."""


def with_twins(sites: Sequence[SiteData], *, seed: int) -> list[SiteData]:
    """Each site's pixel videos plus one transformed copy per `REID_TWINS` entry, as more visits of the patient.

    Trained on these, the re-id model matches a mirrored, shifted, re-gained or re-speckled copy of a real frame
    to its patient, so the audit withholds such copies too.
    """
    rng = np.random.default_rng(seed)
    out = []
    for site in sites:
        videos, records = list(site.videos), list(site.records)
        for name in REID_TWINS:
            for record, video in zip(site.records, site.videos, strict=True):
                videos.append(to_uint8(TRANSFORMS[name](to_unit(video).numpy(), rng)))
                records.append(record)
        out.append(replace(site, videos=videos, records=records))
    return out


IMAGE_FRAMES = ("all", "end_diastole")
"""Which frames of each video the image flow learns (``train.image_flow.frames``)."""


def image_flow_frames(sites: Sequence[SiteData], frames: str) -> list[SiteData]:
    """The frames the image flow learns: every frame, or each video's end-diastolic frame and its two neighbours.

    ``end_diastole`` makes every generated first frame an ED frame, so the video flow contracts the heart from its
    full size and a released video's EDV is the first frame's, drawn without regard to the EF requested later — as
    the EDV of a real heart is (on the phantom, EDV and EF are uncorrelated, r = 0.02). ED frames come from each
    site's ``VolumeTracings.csv``; a video with none is left out and listed in the site's ``problems``.
    """
    if frames not in IMAGE_FRAMES:
        raise EchoFlowError(f"train.image_flow.frames: {frames!r}; choose one of {', '.join(IMAGE_FRAMES)}")
    if frames == "all":
        return list(sites)
    out = []
    for site in sites:
        ed: dict[str, int] = {}
        for root in {record.path.parent.parent for record in site.records}:
            ed |= end_diastolic_frames(root)
        kept, missing = [], []
        for record, video in zip(site.records, site.videos, strict=True):
            frame = ed.get(record.file_name)
            if frame is None or frame >= len(video):
                missing.append(f"{record.path}: no end-diastolic frame in VolumeTracings.csv, left out of the "
                               "image flow")
            else:
                kept.append((record, video[max(0, frame - 1): frame + 2]))
        if not kept:
            raise EchoFlowError(f"{site.name}: train.image_flow.frames=end_diastole needs VolumeTracings.csv with "
                                f"an ED frame per video; none found")
        out.append(replace(site, records=[r for r, _ in kept], videos=[v for _, v in kept],
                           problems=[*site.problems, *missing]))
    return out


def stage_sites(name: str, sites: Sequence[SiteData], vae: AdversarialVAE | None, *, seed: int) -> list[SiteData]:
    """What stage ``name`` trains on: the pixel sites (vae, ef), or their latents under ``vae`` (re-id: with twins)."""
    if name not in LATENT_STAGES:
        return list(sites)
    if vae is None:
        raise EchoFlowError(f"{name}: the latent stages need the trained VAE")
    return encode_sites(vae, with_twins(sites, seed=seed) if name == "reid" else sites)


def stage_dataset(name: str, sites: Sequence[SiteData], *, clip_frames: int, clip_fps: float) -> Dataset[Batch]:
    """The dataset stage ``name`` trains on (pixel sites for vae/ef, latent sites for the others)."""
    if name in ("vae", "image_flow"):
        return FrameDataset(sites)
    if name == "reid":
        return PatientPairDataset(sites)
    return ClipDataset(sites, frames=clip_frames, fps=clip_fps)
