"""The five EchoFlow training stages as `trainer.Stage`s: how a batch becomes the loss of each network.

========== ======================= ============================== ==================================
stage      network(s)              batch (from `data.sites`)      loss
========== ======================= ============================== ==================================
vae        AdversarialVAE + disc   frames (B,1,H,W)               L1 + KL + adaptive-weight hinge GAN
image_flow LatentImageFlow         latent frames (B,C,h,w)        flow matching (velocity or x1)
reid       ReidEncoder             latent pairs a, b + patient    InfoNCE over same-patient pairs
video_flow LatentVideoFlow         latent clips (B,C,T,h,w) + EF  flow matching, first frame + EF cond.
ef         EFRegressor             pixel clips (B,1,T,H,W) + EF   MSE on EF/100, shape-not-texture aug.
========== ======================= ============================== ==================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from echoflow.models.ef import EFRegressor, augment_clip, ef_loss
from echoflow.models.flow import Schedule, Target, flow_matching_loss
from echoflow.models.image_flow import conditions_on_ef
from echoflow.models.reid import ReidEncoder, augment_latent, info_nce_loss
from echoflow.models.vae import (
    AdversarialVAE,
    PatchDiscriminator,
    adaptive_weight,
    adversarial_factor,
    discriminator_loss,
    generator_loss,
    kl_loss,
    reconstruction_loss,
)
from echoflow.models.video_flow import LatentVideoFlow
from echoflow.stages.networks import build_network
from echoflow.stages.trainer import Batch, Stage


class VAEStage:
    """Adversarial VAE: the autoencoder (``model``) and its patch discriminator (``disc``).

    The adversarial term switches on at ``adv_start`` and is weighted adaptively (VQGAN rule) against L1,
    so it adds texture (speckle) without overpowering reconstruction. ``adaptive=False`` uses the fixed
    ``adv_weight`` — under DP-SGD, where a second gradient pass through the decoder would disturb Opacus'
    per-sample hooks.
    """

    name = "vae"

    def __init__(self, vae: AdversarialVAE, disc: PatchDiscriminator, *, kl_weight: float, adv_weight: float,
                 adv_start: int, adaptive: bool = True) -> None:
        self.vae, self.disc = vae, disc
        self.kl_weight, self.adv_weight, self.adv_start, self.adaptive = kl_weight, adv_weight, adv_start, adaptive
        self._recon: Tensor | None = None

    def groups(self) -> dict[str, nn.Module]:
        """``model``: the VAE; ``disc``: the discriminator."""
        return {"model": self.vae, "disc": self.disc}

    def loss(self, group: str, batch: Batch, *, step: int) -> tuple[Tensor, dict[str, float]]:
        """Autoencoder loss, then discriminator loss on the same step's reconstruction."""
        frames = batch["frame"]
        if group == "disc":
            if self._recon is None:
                raise RuntimeError("VAEStage: the model group must run before the discriminator")
            # One call per half, so Opacus sees one gradient row per item (real_i and its reconstruction).
            real, fake = self.disc(frames), self.disc(self._recon)
            return discriminator_loss(real, fake), {}
        recon, mean, logvar = self.vae(frames)
        self._recon = recon.detach()
        l1, kl = reconstruction_loss(recon, frames), kl_loss(mean, logvar)
        total = l1 + self.kl_weight * kl
        factor = adversarial_factor(step, start=self.adv_start)
        logged = {"l1": float(l1.detach()), "kl": float(kl.detach())}
        if factor > 0:
            g = generator_loss(self.disc(recon))
            weight = (adaptive_weight(l1, g, self.vae.last_layer_weight) if self.adaptive else
                      torch.tensor(1.0)) * self.adv_weight * factor
            total = total + weight * g
            logged |= {"g": float(g.detach()), "adv_weight": float(weight)}
        return total, logged


class FlowStage:
    """Flow matching of a latent network; one class serves the image flow and the video flow.

    Image flow: batches of latent ``frame``s, optionally conditioned on ``site`` and on their video's ``ef``
    (when the network has an EF embedding). Video flow: latent ``clip``s,
    conditioned on their own first frame and on EF (dropped with probability ``p_uncond`` for guidance).
    """

    def __init__(self, name: str, net: nn.Module, *, target: Target, schedule: Schedule, p_uncond: float,
                 condition_on_site: bool = False) -> None:
        self.name, self.net = name, net
        self.target, self.schedule, self.p_uncond = target, schedule, p_uncond
        self.condition_on_site = condition_on_site
        self.condition_on_ef = conditions_on_ef(net)

    def groups(self) -> dict[str, nn.Module]:
        """``model``: the velocity network."""
        return {"model": self.net}

    def loss(self, group: str, batch: Batch, *, step: int) -> tuple[Tensor, dict[str, float]]:
        """Flow-matching loss on latent frames or clips."""
        cond: dict[str, Any] = {}
        if "clip" in batch:
            first = batch["clip"][:, :, 0]
            x1 = cast(LatentVideoFlow, self.net).to_motion(batch["clip"], first)
            cond = {"first_frame": first, "ef": batch["ef"]}
        else:
            x1 = batch["frame"]
            if self.condition_on_site:
                cond = {"site": batch["site"]}
            if self.condition_on_ef:
                cond["ef"] = batch["ef"]
        p_uncond = self.p_uncond if cond else 0.0  # nothing to drop for an unconditional image flow
        loss = flow_matching_loss(self.net, x1, target=self.target, schedule=self.schedule, p_uncond=p_uncond,
                                  **cond)
        return loss, {}


class ReidStage:
    """Latent re-identification: InfoNCE on two latent frames of the same patient per item.

    With ``augment``, each frame is independently mirrored/shifted (`augment_latent`) so the embedding is
    invariant to those copies-with-a-twist of a real frame.
    """

    name = "reid"

    def __init__(self, encoder: ReidEncoder, *, temperature: float, augment: bool = True) -> None:
        self.encoder, self.temperature, self.augment = encoder, temperature, augment

    def groups(self) -> dict[str, nn.Module]:
        """``model``: the re-id encoder."""
        return {"model": self.encoder}

    def loss(self, group: str, batch: Batch, *, step: int) -> tuple[Tensor, dict[str, float]]:
        """Symmetric InfoNCE; one encoder call per frame of the pair (one per-sample gradient row per item)."""
        a, b = (augment_latent(batch[k]) if self.augment else batch[k] for k in ("a", "b"))
        emb_a, emb_b = self.encoder(a), self.encoder(b)
        return info_nce_loss(emb_a, emb_b, batch["patient"], temperature=self.temperature), {}


class EFStage:
    """EF regression on pixel clips, augmented (gain, blur, noise, shift) so it reads shape, not texture."""

    name = "ef"

    def __init__(self, regressor: EFRegressor, *, augment: bool) -> None:
        self.regressor, self.augment = regressor, augment

    def groups(self) -> dict[str, nn.Module]:
        """``model``: the regressor."""
        return {"model": self.regressor}

    def loss(self, group: str, batch: Batch, *, step: int) -> tuple[Tensor, dict[str, float]]:
        """MSE in EF/100 units; logs MAE in EF points."""
        clip = augment_clip(batch["clip"]) if self.augment else batch["clip"]
        pred = self.regressor(clip)
        return ef_loss(pred, batch["ef"]), {"mae": float((pred.detach() - batch["ef"]).abs().mean())}


def build_stage(name: str, model: Mapping[str, Any], loss: Mapping[str, Any]) -> Stage:
    """A fresh stage ``name``: networks from the ``model`` config group, ``loss`` = ``train.<stage>.loss``."""
    net = build_network(name, model)
    if name == "vae":
        disc = PatchDiscriminator(**model["discriminator"])
        return VAEStage(cast(AdversarialVAE, net), disc, **loss)
    if name in ("image_flow", "video_flow"):
        return FlowStage(name, net, **loss)
    if name == "reid":
        return ReidStage(cast(ReidEncoder, net), **loss)
    return EFStage(cast(EFRegressor, net), **loss)
