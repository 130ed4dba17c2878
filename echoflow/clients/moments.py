"""A site's latent moments for the federated VAE's ``latent_scale``, exact or through a Gaussian mechanism.

Without DP a site reports ``count`` (latent elements), ``mean`` and ``var`` (population variance) of the global
VAE's latent means over its TRAIN frames. Under DP these three numbers are derived from real patients, so they go
through a Gaussian mechanism charged to the site's one ledger (the plan's ``latent_moments`` share): per patient
the mean of its latent values m_p (clipped to ±`MEAN_BOUND`) and of their squares s_p (clipped to
[0, `SQUARE_BOUND`]); the sums Σ m_p, Σ s_p and the patient count N each get N(0, (σ·Δ)²) with
Δ = √(MEAN_BOUND² + SQUARE_BOUND² + 1), the L2 change one patient can make to the three. The site answers
``count`` = noisy N (patients), ``mean`` = Σ m_p / N and ``var`` = Σ s_p / N − mean². The release is kept in
the ledger: asking again returns the same numbers at no further cost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from echoflow.clients.dp import PrivacyLedger, item_patients
from echoflow.clients.policy import PolicyRefusal, secret_generator
from echoflow.clients.settings import ClientSettings
from echoflow.errors import EchoFlowError
from echoflow.federation.task import load_group_arrays, load_task
from echoflow.models.vae import AdversarialVAE

#: The plan's key for the latent moments' share of a site's ε.
LATENT_MOMENTS = "latent_moments"
#: Per-patient clipping of the mean latent value and of the mean squared latent value (the VAE's latents are
#: KL-regularised towards N(0, 1): a patient's mean rarely leaves ±2, its mean square rarely exceeds 4).
MEAN_BOUND, SQUARE_BOUND = 2.0, 4.0


def latent_moments(settings: ClientSettings, arrays: Mapping[str, Tensor],
                   ledger: PrivacyLedger | None) -> tuple[dict[str, float], PrivacyLedger | None]:
    """The site's latent moments under ``arrays`` (see the module docstring) and its (updated) ledger."""
    settings.refuse("latent moments", training=False)
    policy = settings.policy
    if policy.enabled and LATENT_MOMENTS not in policy.plan:
        raise PolicyRefusal(f"site {settings.site} refuses latent moments: no {LATENT_MOMENTS!r} share in its dp-plan")
    if ledger is not None and LATENT_MOMENTS in ledger.releases:
        return dict(ledger.releases[LATENT_MOMENTS]), ledger
    sums, squares, elements, patients = _per_patient(settings, arrays)
    if not policy.enabled:
        count = elements.sum()
        mean = sums.sum() / max(count, 1)
        return {"count": float(count), "mean": mean, "var": max(squares.sum() / max(count, 1) - mean**2, 0.0)}, ledger
    if ledger is None:
        ledger = PrivacyLedger(epsilon=policy.epsilon, delta=policy.delta_for(patients))
    mechanism = ledger.begin_stage(LATENT_MOMENTS, share=policy.plan[LATENT_MOMENTS], sample_rate=1.0,
                                   planned_steps=1)
    if not ledger.can_spend(LATENT_MOMENTS, 1):
        raise PolicyRefusal(f"site {settings.site} refuses latent moments: their budget is spent")
    per_mean = np.clip(sums / np.maximum(elements, 1), -MEAN_BOUND, MEAN_BOUND)
    per_square = np.clip(squares / np.maximum(elements, 1), 0.0, SQUARE_BOUND)
    std = mechanism.noise_multiplier * math.sqrt(MEAN_BOUND**2 + SQUARE_BOUND**2 + 1.0)
    generator = secret_generator(policy, stage=LATENT_MOMENTS, server_round=0)
    noise = torch.normal(0.0, std, (3,), generator=generator, dtype=torch.float64).tolist()
    count = max(len(per_mean) + noise[2], 1.0)
    mean = (per_mean.sum() + noise[0]) / count
    released = {"count": float(count), "mean": float(mean),
                "var": float(max((per_square.sum() + noise[1]) / count - mean**2, 1e-6))}
    ledger.count_step(LATENT_MOMENTS)
    ledger.releases[LATENT_MOMENTS] = released
    return dict(released), ledger


def _per_patient(settings: ClientSettings,
                 arrays: Mapping[str, Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per patient of the site's TRAIN frames: sum and sum of squares of latent means, element count; patients."""
    task = load_task(settings.task)
    stage = task.build_stage(settings.stage, settings.config)
    load_group_arrays(stage, arrays)
    vae = stage.groups()["model"]
    if not isinstance(vae, AdversarialVAE):
        raise EchoFlowError(f"stage {settings.stage}: latent statistics need an AdversarialVAE as group 'model'")
    train, _ = task.site_data(settings.stage, settings.site_dir, settings.config)
    _, patient = np.unique(item_patients(train), return_inverse=True)
    n = int(patient.max()) + 1 if len(patient) else 0
    sums, squares, elements = np.zeros(n), np.zeros(n), np.zeros(n)
    vae.eval()
    start = 0
    with torch.no_grad():
        for batch in DataLoader(train, batch_size=64):
            z = vae.encode(batch["frame"]).mode().double().flatten(1)
            rows = patient[start : start + len(z)]
            np.add.at(sums, rows, z.sum(1).numpy())
            np.add.at(squares, rows, z.square().sum(1).numpy())
            np.add.at(elements, rows, z.shape[1])
            start += len(z)
    return sums, squares, elements, n
