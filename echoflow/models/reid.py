"""Re-identification encoder: latent frames -> unit embeddings whose cosine similarity says "same patient".

The privacy audit withholds a generated sample when its embedding is too similar to any real patient's.
EchoNet-Synthetic trains a Siamese network that classifies |e1 - e2| of a pair; we instead train an embedding
with InfoNCE over same-patient pairs, because

* cosine similarity of L2-normalised embeddings is exactly what the audit's FAISS inner-product index searches,
  so every site indexes its real data once and nearest-neighbour search replaces an all-pairs classifier;
* scoring costs one forward per sample instead of one per (generated, real) pair;
* a training item is one pair (a, b) of frames of one patient, so Opacus' Poisson sampling draws items and
  per-item clipping bounds each pair's own gradient; the negatives are simply the other items in the batch.

Caveat for DP-SGD: the InfoNCE denominator couples the items of a batch, so per-sample clipping bounds each item's
direct gradient but not its influence through other items' negatives (a known limitation of contrastive DP-SGD).

Call the encoder once on ``a`` and once on ``b`` (not on their concatenation): under ``GradSampleModule`` the two
forward passes accumulate into one per-item gradient with batch dimension B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echoflow.errors import EchoFlowError
from echoflow.models.blocks import ResBlock, group_norm


class ReidEncoder(nn.Module):
    """Latent frames (B, latent_channels, h, w) -> L2-normalised embeddings (B, dim).

    Features are pooled to a 4x4 grid rather than globally: identity lies in where anatomy is, and a global
    average of random-looking latent patterns makes every patient look alike. Works for any h, w >= 8.

    Args:
        latent_channels: channels of the VAE latent (4).
        channels: width at latent resolution; doubled after the one stride-2 downsampling.
        dim: embedding dimension (128).
    """

    def __init__(self, *, latent_channels: int = 4, channels: int = 64, dim: int = 128) -> None:
        super().__init__()
        wide = 2 * channels
        self.features = nn.Sequential(
            nn.Conv2d(latent_channels, channels, 3, padding=1),
            ResBlock(channels, channels),
            nn.Conv2d(channels, wide, 3, stride=2, padding=1),
            ResBlock(wide, wide),
            group_norm(wide),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.head = nn.Linear(16 * wide, dim)

    def forward(self, z: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) -> unit-norm embeddings (B, dim)."""
        return F.normalize(self.head(self.features(z)), dim=-1)


def _check_patients(emb: Tensor, patient: Tensor) -> None:
    if emb.ndim != 2 or patient.shape != emb.shape[:1]:
        raise EchoFlowError(
            f"reid: expected embeddings (N, D) and patient ids (N,), got {tuple(emb.shape)}, {tuple(patient.shape)}"
        )


def info_nce_loss(emb_a: Tensor, emb_b: Tensor, patient: Tensor, *, temperature: float = 0.1) -> Tensor:
    """Symmetric multi-positive InfoNCE (SupCon's L_out) over the 2B embeddings of B same-patient pairs.

    Every embedding is an anchor; its positives are all other embeddings of the same patient (its pair partner
    and both frames of any other item with that patient id), its negatives all embeddings of other patients.

    Args:
        emb_a: (B, D) unit-norm embeddings of the first frames.
        emb_b: (B, D) unit-norm embeddings of the second frames, same patients as ``emb_a`` row by row.
        patient: (B,) integer patient ids.
        temperature: softmax temperature on cosine similarity.

    Returns:
        Scalar loss: mean over anchors of -mean over positives of log softmax similarity.
    """
    if emb_a.shape != emb_b.shape:
        raise EchoFlowError(f"reid: pair embeddings differ in shape, {tuple(emb_a.shape)} vs {tuple(emb_b.shape)}")
    _check_patients(emb_a, patient)
    emb = torch.cat([emb_a, emb_b])
    ids = torch.cat([patient, patient])
    self_mask = torch.eye(len(ids), dtype=torch.bool, device=emb.device)
    logits = (emb @ emb.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits.log_softmax(dim=1)
    positive = (ids[:, None] == ids[None, :]) & ~self_mask
    pos_log_prob = log_prob.masked_fill(~positive, 0.0).sum(dim=1) / positive.sum(dim=1)
    return -pos_log_prob.mean()


def verification_auc(emb: Tensor, patient: Tensor) -> float:
    """ROC AUC of cosine similarity for telling same-patient pairs from different-patient pairs.

    Uses every unordered pair i < j; rank-based (Mann-Whitney U, ties counted half).

    Args:
        emb: (N, D) embeddings (normalised here).
        patient: (N,) integer patient ids; needs at least one same- and one different-patient pair.
    """
    _check_patients(emb, patient)
    e = F.normalize(emb.detach().double(), dim=-1)
    i, j = torch.triu_indices(len(e), len(e), offset=1, device=e.device)
    scores = (e[i] * e[j]).sum(dim=-1)
    same = patient[i] == patient[j]
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    if n_pos == 0 or n_neg == 0:
        raise EchoFlowError("reid: verification AUC needs both same-patient and different-patient pairs")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]
    return float((ranks[same].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def augment_latent(z: Tensor, *, max_shift: int = 1, flip: bool = True) -> Tensor:
    """Random per-sample left-right mirror and shift (±``max_shift`` latent pixels, wrapping) of latents (B, C, h, w).

    Trained on pairs augmented this way, the encoder matches a patient's mirrored or shifted frames too — the
    audit's canaries (a copied frame mirrored, or shifted a few pixels) must still be caught.
    """
    if flip:
        mirror = torch.rand(z.shape[0], device=z.device) < 0.5
        z = torch.where(mirror[:, None, None, None], z.flip(-1), z)
    if max_shift > 0:
        shifts = torch.randint(-max_shift, max_shift + 1, (z.shape[0], 2)).tolist()
        z = torch.stack([x.roll((dy, dx), dims=(-2, -1)) for x, (dy, dx) in zip(z, shifts, strict=True)])
    return z
