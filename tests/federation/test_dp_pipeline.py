"""The pipeline under `dp=eps8`, tiny: every stage trains under DP, within ONE budget per site (slow: Ray, minutes).

The attack it answers (issue 16): with one ledger calibrated for the VAE alone, every later stage was refused in
every round and the pipeline went on with untrained image flow, re-id, video flow and EF weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from echoflow.cli.pipeline import with_pipeline
from echoflow.config import load_config
from echoflow.server.checkpoint import load_latest
from echoflow.study.run import run_pipeline
from echoflow.tracking import start_run

STAGES = ("vae", "image_flow", "reid", "video_flow", "ef")
TINY = [
    "dp=eps8", "data.sites=2", "data.patients_per_site=8", "data.test_patients=2", "federation.sites=2",
    "pipeline.videos=6", "pipeline.ef_steps=5", "train.sampling.steps=2", "model.vae.base_channels=8",
    "model.image_flow.channels=[8,16]", "model.video_flow.channels=[8,16]", "model.reid.channels=8",
    "model.ef.channels=[4,8,8,8]",
    *(f"pipeline.federation.{stage}={{federation.rounds:2,federation.local_steps:3}}" for stage in STAGES),
]


@pytest.mark.slow
def test_dp_pipeline_trains_every_stage_within_one_budget_per_site(tmp_path: Path) -> None:
    cfg = load_config(with_pipeline([*TINY, f"workdir={tmp_path}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]))
    with start_run(cfg, "pipeline"):
        run_pipeline(cfg)
    plan, epsilon = dict(cfg.dp.plan), float(cfg.dp.epsilon)
    spent = 0.0
    for stage in STAGES:
        state = load_latest(tmp_path / "federation" / stage)
        assert state is not None and state.round == 2, stage
        assert [entry["trained"] for entry in state.history] == [2, 2], stage  # every round, every site, under DP
        for site, values in state.history[-1]["sites"].items():
            assert values["dp-steps"] > 0 and values["dp-noise-multiplier"] > 0, (stage, site)
            assert values["epsilon"] <= values["epsilon-cap"] * (1 + 1e-9) <= epsilon * (1 + 1e-9), (stage, site)
            spent = max(spent, values["epsilon"])
        after = [round(v["epsilon"], 3) for v in state.history[-1]["sites"].values()]
        print(f"{stage}: ε per site after the stage {after} (plan share {plan[stage]})")
    assert 0.9 * epsilon * (1 - plan["latent_moments"]) < spent <= epsilon  # the run spends its budget, never more
    assert (tmp_path / "audit" / "released" / "FileList.csv").is_file()
    summary = json.loads((tmp_path / "summary" / "summary.json").read_text())
    assert list(summary["epsilon_after_stage"]) == list(STAGES) and summary["epsilon_after_stage"]["ef"] <= epsilon
    assert "unit: one patient" in (tmp_path / "summary" / "summary.md").read_text()
