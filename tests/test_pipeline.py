import json
from pathlib import Path

import mlflow
import pytest

from echoflow.cli.pipeline import with_pipeline
from echoflow.config import load_config
from echoflow.pipeline import run_pipeline
from echoflow.tracking import start_run

TINY = [
    "data.sites=2", "data.patients_per_site=8", "federation.sites=2", "pipeline.videos=6", "pipeline.ef_steps=5",
    "train.sampling.steps=2", "model.vae.base_channels=8", "model.image_flow.channels=[8,16]",
    "model.video_flow.channels=[8,16]", "model.reid.channels=8", "model.ef.channels=[4,8,8,8]",
    *(f"pipeline.federation.{stage}={{federation.rounds:1,federation.local_steps:3}}"
      for stage in ("vae", "image_flow", "reid", "video_flow")),
]


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_then_resumes_without_redoing(tmp_path: Path) -> None:
    cfg = load_config(with_pipeline([*TINY, f"workdir={tmp_path}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]))
    with start_run(cfg, "pipeline") as run:
        summary = run_pipeline(cfg)
    for artifact in ("summary/summary.json", "summary/summary.html", "summary/summary.md", "summary/ef_scatter.png",
                     "summary/loss_curves.png", "audit/audit.json", "audit/audit.html", "audit/released/FileList.csv"):
        assert (tmp_path / artifact).is_file(), artifact
    assert {row["trained on"] for row in summary["parity"]} == {"real", "synthetic", "real+synthetic"}
    released = json.loads((tmp_path / "pipeline" / "audit.json").read_text())["released"]
    assert released == len(list((tmp_path / "audit" / "released" / "Videos").glob("*.avi"))) > 0
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/m.db")
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert {c.info.run_name for c in children} >= {f"federate-{s}" for s in ("vae", "image_flow", "reid", "video_flow")}
    # every step is marked done: a re-run does no work and gives the same summary
    marks = sorted(p.name for p in (tmp_path / "pipeline").iterdir())
    assert marks == ["audit.json", "cohort.json", "evaluate.json", "generate.json", "models.json"]
    generated = (tmp_path / "generated" / "FileList.csv").stat().st_mtime_ns
    assert run_pipeline(cfg)["parity"] == summary["parity"]
    assert (tmp_path / "generated" / "FileList.csv").stat().st_mtime_ns == generated
