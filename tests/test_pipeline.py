import importlib
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import mlflow
from pytest import MonkeyPatch
from typer.testing import CliRunner

import echoflow.data.sites as sites
import echoflow.stages.networks as networks
from echoflow.cli import app
from echoflow.cli.pipeline import with_pipeline
from echoflow.config import load_config, plain
from echoflow.server.checkpoint import load_latest
from echoflow.stages import GENERATIVE
from echoflow.stages.objectives import build_stage
from echoflow.study.run import run_pipeline, scaled_training
from echoflow.tracking import start_run
from tests.federation.processes import REPO, alive, descendants, process_pool, ray_processes

TINY = [
    "data.sites=2", "data.patients_per_site=8", "data.test_patients=2", "federation.sites=2", "pipeline.videos=6",
    "pipeline.ef_steps=5", "train.sampling.steps=2", "model.vae.base_channels=8", "model.image_flow.channels=[8,16]",
    "model.video_flow.channels=[8,16]", "model.reid.channels=8", "model.ef.channels=[4,8,8,8]",
    *(f"pipeline.federation.{stage}={{federation.rounds:1,federation.local_steps:3}}"
      for stage in ("vae", "image_flow", "reid", "video_flow", "ef")),
]


def test_tiny_pipeline_end_to_end_then_resumes_without_redoing(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    cfg = load_config(with_pipeline([*TINY, f"workdir={tmp_path}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]))
    loaded, decoded = Counter[str](), Counter[tuple[Path, int]]()
    read_weights, decode = networks.load_safetensors, sites.load_video
    monkeypatch.setattr(networks, "load_safetensors", lambda path, data: loaded.update([path.parent.name])
                        or read_weights(path, data))
    monkeypatch.setattr(sites, "load_video", lambda path, *, size: decoded.update([(path, size)])
                        or decode(path, size=size))
    with start_run(cfg, "pipeline") as run:
        summary = run_pipeline(cfg)
    # every trained model is read once per run (the parity regressors, trained in worker processes, once each
    # after), every video decoded once per process (the sites run in Ray)
    assert loaded == dict.fromkeys(["vae", "image_flow", "reid", "video_flow", "ef", "real", "synthetic",
                                    "real+synthetic"], 1)
    assert decoded and set(decoded.values()) == {1}
    for artifact in ("summary/summary.json", "summary/summary.html", "summary/summary.md", "summary/ef_scatter.png",
                     "summary/loss_curves.png", "audit/audit.json", "audit/audit.html", "audit/released/FileList.csv"):
        assert (tmp_path / artifact).is_file(), artifact
    sources = {row["trained on"] for row in summary["parity"]}
    assert sources == {"real", "synthetic", "real+synthetic", "federated real"}
    released = json.loads((tmp_path / "pipeline" / "audit.json").read_text())["released"]
    assert released == len(list((tmp_path / "audit" / "released" / "Videos").glob("*.avi"))) > 0
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/m.db")
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    stages = ("vae", "image_flow", "reid", "video_flow", "ef")
    assert {c.info.run_name for c in children} >= {f"federate-{s}" for s in stages}
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "audit")}
    assert "audit/audit.html" in logged and "audit/indexes" not in logged  # real embeddings stay out of MLflow
    # every step is marked done: a re-run does no work and gives the same summary
    timing = {row["step"]: row for row in summary["timing"]}  # the per-step wall-time table, also in MLflow
    assert {"cohort", "models", "generate", "audit", "evaluate", "embed real frames", "train vae",
            "train ef"} <= set(timing)
    assert all(timing[s]["seconds"] > 0 for s in ("models", "generate", "audit", "evaluate"))
    assert timing["embed real frames"]["inside"] == "generate" and (tmp_path / "summary" / "timing.md").is_file()
    assert client.get_run(run.info.run_id).data.metrics["timing.models_s"] == timing["models"]["seconds"]
    marks = sorted(p.name for p in (tmp_path / "pipeline").iterdir())
    assert marks == ["audit.json", "cohort.json", "evaluate.json", "generate.json", "models.json"]
    generated = (tmp_path / "generated" / "FileList.csv").stat().st_mtime_ns
    assert run_pipeline(cfg)["parity"] == summary["parity"]
    assert (tmp_path / "generated" / "FileList.csv").stat().st_mtime_ns == generated


def test_pipeline_killed_during_video_flow_finishes_without_redoing_earlier_stages(tmp_path: Path) -> None:
    video_flow = "pipeline.federation.video_flow={federation.rounds:3,federation.local_steps:3}"
    argv = ["echoflow", "pipeline", *TINY, video_flow, f"workdir={tmp_path}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]
    federation = tmp_path / "federation"
    env = os.environ | {"PYTHONPATH": str(REPO), "ECHOFLOW_QUIET": "1"}
    with process_pool(env) as start:
        first = start(argv, tmp_path / "first.log")
        deadline = time.monotonic() + 600
        while not (federation / "video_flow" / "LATEST").exists():  # video flow's first round is checkpointed
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.1)
        tree = descendants(first.pid) + ray_processes(first.pid)
        os.killpg(first.pid, signal.SIGKILL)
        for pid in tree:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        first.wait(timeout=30)
    killed = load_latest(federation / "video_flow")
    assert killed is not None and killed.round < 3
    earlier = {stage: (federation / stage / "LATEST").stat().st_mtime_ns for stage in ("vae", "image_flow", "reid")}
    assert not (tmp_path / "pipeline" / "models.json").exists()

    with process_pool(env) as start:
        second = start(argv, tmp_path / "second.log")
        assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()
    assert {stage: (federation / stage / "LATEST").stat().st_mtime_ns for stage in earlier} == earlier
    final = load_latest(federation / "video_flow")
    assert final is not None and final.round == 3
    assert final.history[: killed.round] == killed.history  # resumed after its last round, not restarted
    assert (tmp_path / "audit" / "released" / "FileList.csv").is_file()
    assert (tmp_path / "summary" / "summary.json").is_file()


def test_pipeline_multirun_gives_each_sweep_point_its_own_workdir(monkeypatch: MonkeyPatch, tmp_path: Path) -> None:
    command = importlib.import_module("echoflow.cli.pipeline")  # the package re-exports the function under this name
    ran: list[list[str]] = []
    monkeypatch.setattr(command, "run_one", ran.append)
    result = CliRunner().invoke(app, ["pipeline", "--multirun", "dp=none,eps8", f"workdir={tmp_path}"])
    assert result.exit_code == 0, result.output
    assert [o for point in ran for o in point if o.startswith(("dp=", "workdir=", "+pipeline="))] == [
        "+pipeline=demo", "dp=none", f"workdir={tmp_path}", f"workdir={tmp_path}/sweep_000",
        "+pipeline=demo", "dp=eps8", f"workdir={tmp_path}", f"workdir={tmp_path}/sweep_001"]
    assert [load_config(point).dp.enabled for point in ran] == [False, True]
    assert [load_config(point).workdir for point in ran] == [f"{tmp_path}/sweep_000", f"{tmp_path}/sweep_001"]


def test_scaling_sweep_axes_scale_the_generative_stages_and_leave_the_ef_recipe() -> None:
    base = load_config(with_pipeline([]))
    scaled = scaled_training(load_config(with_pipeline(["pipeline.train_scale=2", "model=tiny"])))
    for stage in GENERATIVE:
        assert scaled.train[stage].optim.steps == 2 * base.train[stage].optim.steps
        local_steps = "federation.local_steps"
        assert scaled.pipeline.federation[stage][local_steps] == 2 * base.pipeline.federation[stage][local_steps]
        tiny, demo = (sum(p.numel() for p in build_stage(stage, plain(c.model), plain(c.train[stage].loss))
                          .groups()["model"].parameters()) for c in (scaled, base))
        assert tiny < demo / 2.5, stage
    assert scaled.pipeline.federation.ef == base.pipeline.federation.ef and scaled.train.ef == base.train.ef
    assert scaled.model.ef == base.model.ef  # the EF regressor is the evaluation's recipe, not a swept model
