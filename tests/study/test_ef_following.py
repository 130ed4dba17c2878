"""The video flow's EF-following report: line fit, variance shares, and the dose-response grid's layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from typer.testing import CliRunner

from echoflow.cli import app
from echoflow.config import load_config, plain
from echoflow.errors import EchoFlowError
from echoflow.models.video_flow import LatentVideoFlow
from echoflow.stages import GENERATIVE
from echoflow.stages.networks import build_network, save_network
from echoflow.study.ef_following import dose_response, following

EFS = [20.0, 40.0, 60.0, 80.0]


def test_a_flow_that_follows_ef_has_slope_one_and_its_variance_in_the_requested_ef() -> None:
    rng = np.random.default_rng(0)
    grid = np.array(EFS)[None] + rng.normal(0.0, 1.0, (6, 4))
    result = following(grid, EFS)
    assert result.slope == pytest.approx(1.0, abs=0.05) and result.slope_low < 1.0 < result.slope_high
    assert abs(result.intercept) < 3 and result.r2 > 0.99 and result.resid_sd == pytest.approx(1.0, abs=0.4)
    assert result.share_requested_ef > 0.95 and result.share_first_frame < 0.05


def test_a_flow_that_copies_its_first_frame_has_slope_zero_and_its_variance_in_the_first_frame() -> None:
    grid = np.repeat(np.array([30.0, 45.0, 60.0, 70.0, 50.0])[:, None], 4, axis=1)
    result = following(grid, EFS)
    assert result.slope == pytest.approx(0.0, abs=1e-9) and result.slope_low < 0 < result.slope_high
    assert result.share_first_frame == pytest.approx(1.0) and result.share_requested_ef == pytest.approx(0.0)
    assert result.per_ef_mae["20"] == pytest.approx(abs(np.mean([30, 45, 60, 70, 50]) - 20)) and result.r2 < 0


def test_a_compressed_dose_is_read_as_its_slope_and_intercept() -> None:
    grid = 25.0 + 0.5 * np.tile(EFS, (3, 1))
    result = following(grid, EFS)
    assert (result.slope, result.intercept) == (pytest.approx(0.5), pytest.approx(25.0))
    assert result.per_ef_mae == pytest.approx({"20": 15.0, "40": 5.0, "60": 5.0, "80": 15.0})


def test_a_grid_over_one_ef_is_a_readable_error() -> None:
    with pytest.raises(EchoFlowError, match="distinct EFs"):
        following(np.ones((3, 2)), [50.0, 50.0])


class EchoEF(LatentVideoFlow):
    """Predicts the clean motion x1 = requested EF everywhere: its clips end at first frame + EF."""

    def forward(self, x: Tensor, t: Tensor, *, first_frame: Tensor, ef: Tensor | None = None, **_: Any) -> Tensor:
        assert ef is not None
        return ef.view(-1, 1, 1, 1, 1).expand_as(x).clone()


def test_dose_response_animates_every_first_frame_at_every_ef_in_row_major_order() -> None:
    flow = EchoEF(channels=(8, 16), heads=2)
    firsts = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 4, 4, 4) * 1000.0
    grid = dose_response(flow, lambda latents: latents, lambda clips: clips[:, 0, -1].mean((1, 2)), firsts, EFS,
                         frames=8, steps=2, method="heun", target="x1", guidance=1.0)
    assert grid == pytest.approx(np.arange(3.0)[:, None] * 1000.0 + np.array(EFS)[None], abs=1e-3)


def test_cli_evaluate_video_flow_reports_the_grid_by_the_meter_and_the_regressor(tmp_path: Path) -> None:
    """Untrained tiny networks: the command runs end to end, and the report is consistent with its grid."""
    overrides = ["data.sites=1", "data.patients_per_site=4", "model.vae.base_channels=8",
                 "model.image_flow.channels=[8,16]", "model.video_flow.channels=[8,16]", "model.reid.channels=8",
                 "model.ef.channels=[4,8,8,8]", "train.sampling.steps=1", f"workdir={tmp_path}",
                 f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]
    cfg = load_config(overrides)
    for name in (*GENERATIVE, "ef"):
        save_network(build_network(name, plain(cfg.model)), tmp_path / name / "model.safetensors")
    result = CliRunner().invoke(app, ["evaluate", "video-flow", *overrides, "--first-frames", "2", "--efs", "30,60",
                                      "--meter-steps", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "video_flow_ef.json").read_text())
    for reader in ("meter", "regressor"):
        grid = np.array(report[reader]["grid"])
        assert grid.shape == (2, 2) and report[reader]["efs"] == [30.0, 60.0]
        assert report[reader]["mae"] == pytest.approx(np.abs(grid - [30.0, 60.0]).mean())
    assert (tmp_path / "meter" / "model.safetensors").is_file() and "slope" in result.output
