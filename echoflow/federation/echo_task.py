"""The EchoFlow stages as a `SiteTask`: networks from `echoflow.stages`, a site's videos from its own folder.

Latent stages (image_flow, reid, video_flow) encode the site's videos with the GLOBAL VAE of the federated
``vae`` stage, at the site: latents never leave it. The server sends that VAE in every message of the stage
(`echoflow.federation.priors`), so a deployed site needs no folder in common with the server. Decoded (and
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
from echoflow.federation.priors import recall
from echoflow.federation.protocol import PRIOR_DIGESTS
from echoflow.models.vae import AdversarialVAE
from echoflow.stages import LATENT_STAGES
from echoflow.stages.data import encode_sites, image_flow_frames, stage_dataset, stage_sites
from echoflow.stages.networks import build_network, global_network
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

    def prior_stages(self, name: str) -> tuple[str, ...]:
        """Earlier stages whose final global weights stage ``name`` needs at the site: the VAE for latent stages."""
        return ("vae",) if name in LATENT_STAGES else ()

    def site_data(self, name: str, site_dir: Path, config: Mapping[str, Any]) -> tuple[Dataset[Batch], Dataset[Batch]]:
        """The site's TRAIN and VAL datasets for stage ``name`` (latents for the latent stages).

        The global VAE is the one the message carried (``config[PRIOR_DIGESTS]["vae"]``); without one (a task
        driven outside the Flower apps) it is read from ``config["stage_checkpoints"]["vae"]``'s latest round.
        """
        folders = dict(config.get("stage_checkpoints") or {})
        digests = dict(config.get(PRIOR_DIGESTS) or {})
        if name in LATENT_STAGES and "vae" not in digests:  # the cache key names the VAE: new round, new latents
            folders["vae"] = str(vae_round(folders.get("vae")))
        elif name not in LATENT_STAGES or "vae" in digests:
            folders.pop("vae", None)  # not read: the key must not depend on a server path
        key = {**config, "stage_checkpoints": folders, PRIOR_DIGESTS: digests}
        return _site_data(name, str(site_dir), json.dumps(key, sort_keys=True))


@lru_cache(maxsize=4)
def _site_data(name: str, site_dir: str, config_json: str) -> tuple[Dataset[Batch], Dataset[Batch]]:
    cfg = _cfg(json.loads(config_json))
    vae = global_vae(cfg) if name in LATENT_STAGES else None

    clip = {"clip_frames": cfg.data.clip_frames, "clip_fps": cfg.data.clip_fps}

    def dataset(site: SiteData, *, training: bool) -> Dataset[Batch]:
        if name == "image_flow":
            site = image_flow_frames([site], cfg.train.image_flow.frames)[0]
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
    """The federated VAE's global weights: received in a message (`recall`), else from ``stage_checkpoints.vae``."""
    key = cfg.get(PRIOR_DIGESTS, {}).get("vae")
    if key is not None:
        vae = build_network("vae", plain(cfg.model))
        vae.load_state_dict({k[len("model."):]: v for k, v in recall("vae", key).items() if k.startswith("model.")})
    else:
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
