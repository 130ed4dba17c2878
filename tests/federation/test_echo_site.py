"""EchoFlow sites: the shared VAE latent scale pooled from per-site moments; a site without VAL patients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from echoflow.clients.moments import LATENT_MOMENTS, latent_moments
from echoflow.clients.policy import setup_of
from echoflow.clients.settings import ClientSettings
from echoflow.clients.site import evaluate, train_round
from echoflow.config import load_config
from echoflow.data.phantom import generate_cohort
from echoflow.errors import EchoFlowError
from echoflow.federation.echo_task import TASK as ECHO
from echoflow.federation.task import group_arrays
from echoflow.models.vae import measure_latent_scale
from echoflow.server.latent_scale import pooled_std

TINY = ["data.size=32", "data.frames=16", "model.vae.base_channels=4", "model.discriminator.base_channels=4"]


def echo_settings(tmp: Path, site: int, node: dict[str, Any] | None = None, **extra: Any) -> ClientSettings:
    cfg = OmegaConf.to_container(load_config([*TINY, f"workdir={tmp}"]), resolve=True)
    run_config = {"task": "echoflow.federation.echo_task:TASK", "stage": "vae", "config-json": json.dumps(cfg),
                  "rounds": 1, "local-steps": 2, "batch-size": 4, "lr": 1e-3, "data-root": str(tmp / "cohort")}
    return ClientSettings.from_context(run_config | extra, {"partition-id": site} | setup_of(run_config) | (node or {}))


def dp_policy(plan: dict[str, float]) -> dict[str, Any]:
    return {"dp-enabled": True, "dp-epsilon": 8.0, "dp-plan": json.dumps(plan),
            "dp-planned-steps": json.dumps({"vae": 2})}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("echo")
    sites = generate_cohort(root / "cohort", sites=2, patients_per_site=3, seed=0, size=32, frames=16)
    filelist = sites[1] / "FileList.csv"  # site 1 has no VAL patient
    frame = pd.read_csv(filelist)
    frame.loc[frame["Split"] == "VAL", "Split"] = "TRAIN"
    frame.to_csv(filelist, index=False)
    return root


def test_pooled_std_is_the_std_of_all_sites_values() -> None:
    rng = np.random.default_rng(0)
    values = [rng.normal(loc, scale, size) for loc, scale, size in ((0.0, 1.0, 50), (2.0, 0.5, 7), (-1.0, 3.0, 300))]
    moments = [{"count": float(len(v)), "mean": float(v.mean()), "var": float(v.var())} for v in values]
    assert pooled_std(moments) == pytest.approx(float(np.concatenate(values).std(ddof=1)), rel=1e-12)


def test_site_moments_pool_to_the_centralized_latent_scale(cohort: Path) -> None:
    settings = [echo_settings(cohort, site) for site in (0, 1)]
    torch.manual_seed(0)
    stage = ECHO.build_stage("vae", settings[0].config)
    arrays = group_arrays(stage)
    federated = 1.0 / pooled_std([latent_moments(s, arrays, None)[0] for s in settings])
    frames = torch.cat([torch.stack([b["frame"] for b in ECHO.site_data("vae", s.site_dir, s.config)[0]])  # type: ignore[attr-defined]
                        for s in settings])
    centralized = measure_latent_scale(stage.groups()["model"], frames)  # type: ignore[arg-type]
    assert federated == pytest.approx(centralized, rel=1e-6) and federated != pytest.approx(1.0)


def test_a_site_without_val_patients_trains_but_is_not_evaluated(cohort: Path) -> None:
    settings = echo_settings(cohort, 1)
    arrays = group_arrays(ECHO.build_stage("vae", settings.config))
    assert evaluate(settings, arrays) == {"num-examples": 0.0}
    result, _ = train_round(settings, arrays, server_round=1, ledger=None)
    assert result.arrays is not None and result.metrics["num-examples"] > 0
    evaluated = evaluate(echo_settings(cohort, 0), arrays)
    assert evaluated["num-examples"] > 0 and np.isfinite(evaluated["eval-loss"])


def test_dp_latent_moments_are_noised_charged_to_the_one_ledger_and_released_once(cohort: Path) -> None:
    settings = echo_settings(cohort, 0, dp_policy({"vae": 0.5, LATENT_MOMENTS: 0.5}))
    torch.manual_seed(0)
    arrays = group_arrays(ECHO.build_stage("vae", settings.config))
    result, ledger = train_round(settings, arrays, server_round=1, ledger=None)  # patient-level DP-SGD on frames
    assert result.arrays is not None and ledger is not None and 0 < ledger.epsilon() <= 4.0 + 1e-9
    exact, _ = latent_moments(echo_settings(cohort, 0), arrays, None)
    noisy, ledger = latent_moments(settings, arrays, ledger)
    assert ledger is not None and 4.0 < ledger.epsilon() <= 8.0 + 1e-9  # the moments' share, on the same ledger
    assert noisy != exact and noisy["count"] != exact["count"]  # patients, noised — not the exact element count
    spent = ledger.epsilon()
    again, ledger = latent_moments(settings, arrays, ledger)
    assert again == noisy and ledger is not None and ledger.epsilon() == spent  # a repeat costs nothing, says nothing
    with pytest.raises(EchoFlowError, match="refuses latent moments"):
        latent_moments(echo_settings(cohort, 0, dp_policy({"vae": 1.0})), arrays, None)
