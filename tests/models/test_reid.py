import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echoflow.errors import EchoFlowError
from echoflow.models.reid import ReidEncoder, info_nce_loss, verification_auc
from tests.models.test_vae import assert_dp_compatible


def anatomies(n: int, g: torch.Generator) -> Tensor:
    """One smooth latent pattern per patient, (n, 4, 16, 16)."""
    return F.interpolate(torch.randn(n, 4, 8, 8, generator=g), size=(16, 16), mode="bilinear")


def patient_frames(anatomy: Tensor, phase_basis: Tensor, patient: Tensor, g: torch.Generator) -> Tensor:
    """Latent frames of ``patient``: anatomy shifted by up to one cell, plus a large patient-independent
    component (like the cardiac phase: random mix of ``phase_basis``) and noise."""
    frames = anatomy[patient]
    shifts = torch.randint(-1, 2, (len(patient), 2), generator=g)
    frames = torch.stack([f.roll(tuple(s.tolist()), dims=(-2, -1)) for f, s in zip(frames, shifts, strict=True)])
    phase = torch.einsum("nk,kchw->nchw", torch.randn(len(patient), len(phase_basis), generator=g), phase_basis)
    return frames + phase + 0.3 * torch.randn(frames.shape, generator=g)


def test_embeddings_are_unit_norm() -> None:
    emb = ReidEncoder(dim=32)(torch.randn(5, 4, 16, 16))
    assert emb.shape == (5, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5))


def test_info_nce_treats_every_same_patient_embedding_as_positive() -> None:
    patient = torch.tensor([7, 7, 3])  # items 0 and 1 are the same patient
    together = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    apart = torch.eye(3)
    loss_together = info_nce_loss(together, together.clone(), patient, temperature=0.05)
    loss_apart = info_nce_loss(apart, apart.clone(), patient, temperature=0.05)
    # Together: the 4 embeddings of patient 7 each see 3 equally similar positives -> log 3 for 4 of 6 anchors.
    assert loss_together.item() == pytest.approx(2 / 3 * math.log(3), abs=1e-3)
    # Apart: a loss that only counted a_i <-> b_i as positive would be ~0 here and reward the split.
    assert loss_apart.item() > 8
    b = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.6, 0.0, 0.8]])
    torch.testing.assert_close(info_nce_loss(apart, b, patient), info_nce_loss(b, apart, patient))
    with pytest.raises(EchoFlowError, match="patient ids"):
        info_nce_loss(apart, apart, torch.tensor([1, 2]))


def test_verification_auc_is_rank_based_with_ties_counted_half() -> None:
    patient = torch.tensor([0, 0, 1, 1])
    separated = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert verification_auc(separated, patient) == 1.0
    assert verification_auc(torch.ones(4, 2), patient) == 0.5
    # Same-patient pairs score 0, 0; different-patient pairs 1, 1, 0, 0: each positive ties two of four negatives.
    crossed = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert verification_auc(crossed, torch.tensor([0, 1, 0, 1])) == 0.25
    with pytest.raises(EchoFlowError, match="same-patient"):
        verification_auc(separated, torch.arange(4))


def test_encoder_verifies_unseen_patients() -> None:
    g = torch.Generator().manual_seed(0)
    n_train, n_test = 40, 10
    anatomy, phase_basis = anatomies(n_train + n_test, g), torch.randn(4, 4, 16, 16, generator=g)
    unseen = torch.arange(n_train, n_train + n_test).repeat(4)
    raw_auc = verification_auc(patient_frames(anatomy, phase_basis, unseen, g).flatten(1), unseen)
    model = ReidEncoder(channels=16, dim=32)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(50):
        patient = torch.randint(0, n_train, (32,), generator=g)
        emb_a = model(patient_frames(anatomy, phase_basis, patient, g))
        emb_b = model(patient_frames(anatomy, phase_basis, patient, g))
        loss = info_nce_loss(emb_a, emb_b, patient)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        auc = verification_auc(model(patient_frames(anatomy, phase_basis, unseen, g)), unseen)
    assert raw_auc < 0.7 and auc > 0.9, (raw_auc, auc)


def test_reid_encoder_is_dp_compatible_with_two_forwards_per_item() -> None:
    a, b, patient = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 0])

    def pair_loss(m: nn.Module) -> Tensor:
        return info_nce_loss(m(a), m(b), patient)

    assert_dp_compatible(ReidEncoder(channels=16, dim=8), pair_loss, 3)


def test_augment_latent_mirrors_and_shifts_only() -> None:
    from echoflow.models.reid import augment_latent

    z = torch.randn(64, 4, 8, 8)
    out = augment_latent(z)
    assert out.shape == z.shape
    for x, y in zip(z, out, strict=True):
        assert any(torch.equal(c.roll((dy, dx), dims=(-2, -1)), y)
                   for c in (x.flip(-1), x) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    assert not torch.equal(out, z)
