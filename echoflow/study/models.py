"""What a study works with, loaded once per run: the cohort's splits and the four trained EchoFlow models.

`DictConfig` stops here: below the study, code receives these typed objects and plain settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import cast

from omegaconf import DictConfig
from torch import nn

from echoflow.config import plain
from echoflow.data.cohort import cohort_roots, test_cohort_roots
from echoflow.data.sites import Decoded, SiteData, load_sites
from echoflow.models.vae import AdversarialVAE
from echoflow.models.video_flow import LatentVideoFlow
from echoflow.stages.networks import load_network


@dataclass
class Cohort:
    """The run's site folders; every split loaded through it decodes each video once per process.

    Attributes:
        roots: one folder per site (EchoNet layout). size: frame size the videos are decoded at.
        test_roots: the held-out test cohort's site folders (``data.test_patients``), or none.
    """

    roots: list[Path]
    size: int
    test_roots: list[Path] = field(default_factory=list)
    decoded: Decoded = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, cfg: DictConfig) -> Cohort:
        """The cohort of ``cfg`` (the phantom, and its test cohort, are generated on first use)."""
        where = {"workdir": Path(cfg.workdir), "seed": cfg.seed}
        return cls(cohort_roots(cfg.data, **where), cfg.data.size, test_roots=test_cohort_roots(cfg.data, **where))

    def split(self, *splits: str) -> list[SiteData]:
        """Every site's videos of ``splits``."""
        return self.sites(self.roots, *splits)

    def test(self) -> list[SiteData]:
        """The real videos parity is tested on: the test cohort's if there is one, else every site's TEST split."""
        return self.sites(self.test_roots, "TEST") if self.test_roots else self.split("TEST")

    def sites(self, roots: Sequence[Path], *splits: str) -> list[SiteData]:
        """The videos of ``splits`` in other site folders (e.g. released synthetic videos), loaded together."""
        return load_sites(roots, size=self.size, splits=splits, decoded=self.decoded)


class Models:
    """The four trained EchoFlow networks of a run, in eval mode, each read from disk once, when first needed.

    (The audit needs only the VAE and re-id; generation all four.)
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    @classmethod
    def load(cls, cfg: DictConfig) -> Models:
        """The models of ``cfg``'s workdir (``<workdir>/<stage>/model.safetensors``)."""
        return cls(cfg)

    @cached_property
    def vae(self) -> AdversarialVAE:
        """The adversarial VAE."""
        return cast(AdversarialVAE, trained_network(self.cfg, "vae"))

    @cached_property
    def image_flow(self) -> nn.Module:
        """The latent image flow."""
        return trained_network(self.cfg, "image_flow")

    @cached_property
    def reid(self) -> nn.Module:
        """The latent re-identification encoder."""
        return trained_network(self.cfg, "reid")

    @cached_property
    def video_flow(self) -> LatentVideoFlow:
        """The latent video flow."""
        return cast(LatentVideoFlow, trained_network(self.cfg, "video_flow"))


def stage_folder(cfg: DictConfig, name: str) -> Path:
    """Where stage ``name``'s trained model of this run lives."""
    return Path(cfg.workdir) / name


def trained_network(cfg: DictConfig, name: str) -> nn.Module:
    """Stage ``name``'s trained network of this run (``<workdir>/<name>/model.safetensors``)."""
    return load_network(name, plain(cfg.model), stage_folder(cfg, name) / "model.safetensors")
