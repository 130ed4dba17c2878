"""The EchoFlow stages as a `SiteTask`: networks from `echoflow.stages`, a site's videos from its own folder.

Latent stages (image_flow, reid, video_flow) encode the site's videos with the GLOBAL VAE of the federated
``vae`` stage (``config["stage_checkpoints"]["vae"]``), at the site: latents never leave it. Decoded (and
encoded) site data is cached per process, since every round asks for the same data again, and each video is
decoded once per process whatever the stage. A site without
VAL videos trains as usual and gets an empty validation set, so federated evaluation skips it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, Subset

from echoflow.checkpoints import latest_round
from echoflow.config import plain
from echoflow.data.sites import Decoded, SiteData, load_site
from echoflow.errors import EchoFlowError
from echoflow.models.vae import AdversarialVAE
from echoflow.stages import LATENT_STAGES
from echoflow.stages.data import encode_sites, stage_dataset, stage_sites
from echoflow.stages.networks import global_network
from echoflow.stages.objectives import build_stage
from echoflow.stages.trainer import Batch, Stage

log = logging.getLogger(__name__)

_DECODED: Decoded = {}
"""This process's decoded videos: every stage of a site reads the same split again."""


class EchoTask:
    """`SiteTask` for the five EchoFlow stages; ``config`` is the resolved root config as a dict."""

    def build_stage(self, name: str, config: Mapping[str, Any]) -> Stage:
        """Stage ``name`` from ``config["model"]`` and ``config["train"][name]["loss"]``.

        Under DP the VAE uses its fixed adversarial weight: the adaptive one needs a second gradient pass,
        which Opacus' per-sample hooks cannot follow.
        """
        cfg = _cfg(config)
        loss = plain(cfg.train[name].loss)
        if name == "vae" and cfg.get("dp", {}).get("enabled", False):
            loss = {**loss, "adaptive": False}
        return build_stage(name, plain(cfg.model), loss)

    def site_data(self, name: str, site_dir: Path, config: Mapping[str, Any]) -> tuple[Dataset[Batch], Dataset[Batch]]:
        """The site's TRAIN and VAL datasets for stage ``name`` (latents for the latent stages)."""
        folders = dict(config.get("stage_checkpoints") or {})
        if name in LATENT_STAGES:  # the cache key names the VAE round: a newer round means new latents
            folders["vae"] = str(vae_round(folders.get("vae")))
        return _site_data(name, str(site_dir), json.dumps({**config, "stage_checkpoints": folders}, sort_keys=True))


@lru_cache(maxsize=4)
def _site_data(name: str, site_dir: str, config_json: str) -> tuple[Dataset[Batch], Dataset[Batch]]:
    cfg = _cfg(json.loads(config_json))
    vae = global_vae(cfg) if name in LATENT_STAGES else None

    clip = {"clip_frames": cfg.data.clip_frames, "clip_fps": cfg.data.clip_fps}

    def dataset(site: SiteData, *, training: bool) -> Dataset[Batch]:
        if training:  # re-id trains on the site's videos plus their transformed twins
            return stage_dataset(name, stage_sites(name, [site], vae, seed=cfg.seed), **clip)
        return stage_dataset(name, encode_sites(vae, [site]) if vae is not None else [site], **clip)

    train = dataset(load_site(Path(site_dir), size=cfg.data.size, splits=["TRAIN"], decoded=_DECODED), training=True)
    try:
        val = dataset(load_site(Path(site_dir), size=cfg.data.size, splits=["VAL"], decoded=_DECODED), training=False)
    except EchoFlowError as err:  # no (usable) VAL videos: the site trains but is not evaluated
        log.warning("%s: no validation set for %s, evaluation skips this site (%s)", site_dir, name, err)
        val = Subset(train, [])
    return train, val


def global_vae(cfg: DictConfig) -> AdversarialVAE:
    """The federated VAE's global weights (the ``model`` group of the round folder ``stage_checkpoints.vae``)."""
    vae = global_network("vae", plain(cfg.model), Path(cfg.stage_checkpoints.vae))
    if not isinstance(vae, AdversarialVAE):
        raise EchoFlowError("model.vae: not an AdversarialVAE")
    return vae.eval()


def vae_round(folder: str | None) -> Path:
    """The latest round folder of the federated VAE's checkpoint folder."""
    latest = latest_round(Path(folder)) if folder else None
    if latest is None:
        raise EchoFlowError(f"stage_checkpoints.vae: no federated VAE in {folder!r}; federate `vae` first")
    return latest


def _cfg(config: Mapping[str, Any]) -> DictConfig:
    return OmegaConf.create(dict(config))


TASK = EchoTask()
