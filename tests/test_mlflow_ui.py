"""MLflow's own UI over a run the tiny pipeline made: `mlflow server` on a loopback port, headless Chromium.

The browser opens the experiment's runs, the pipeline's parent run, a nested federated stage and the logged
reports; the REST API of the same server confirms what the pages show (params, per-step metrics, artifacts).
Screenshots are kept in ``test-artifacts/mlflow_*.png`` (see `tests.test_browser.ARTIFACTS`). Every wait is
bounded and the server's whole process tree is stopped, pass or fail.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from echoflow.cli.pipeline import with_pipeline
from echoflow.config import load_config
from echoflow.study.run import run_pipeline
from echoflow.tracking import start_run
from tests.browser import Page, find_chromium, open_page
from tests.federation.processes import free_port, process_pool
from tests.test_browser import ARTIFACTS
from tests.test_pipeline import TINY

pytestmark = [pytest.mark.slow, pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH")]

START_S = 180.0  # `mlflow server` start on a busy 2-core machine: ~40 s seen
PREVIEW_FRAME = "document.querySelector('iframe.mlflow-html-iframe')"
BENIGN = ("/ajax-api/2.0/mlflow/users/current",  # the UI asks who is logged in; a server without auth says 404
          "ResizeObserver loop completed with undelivered notifications")  # layout timing, not a failure


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny pipeline, run in a fresh folder (its MLflow artifacts go to ``./mlruns`` there)."""
    work = tmp_path_factory.mktemp("mlflow_ui")
    cfg = load_config(with_pipeline([*TINY, f"workdir={work}/w", f"mlflow.tracking_uri=sqlite:///{work}/m.db"]))
    here = Path.cwd()
    os.chdir(work)
    try:
        with start_run(cfg, "pipeline") as run:
            run_pipeline(cfg)
    finally:
        os.chdir(here)
    return {"db": f"sqlite:///{work}/m.db", "run": run.info.run_id, "experiment": run.info.experiment_id,
            "log": work / "server.log"}


@pytest.fixture(scope="module")
def server(tiny_run: dict[str, Any]) -> Iterator[str]:
    """``http://127.0.0.1:<free port>`` of an `mlflow server` over the tiny run; stopped (whole tree) afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = ["mlflow", "server", "--backend-store-uri", tiny_run["db"], "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    with process_pool(dict(os.environ)) as start:
        process = start(argv, tiny_run["log"])
        deadline = time.monotonic() + START_S
        while True:
            try:
                api(url, "experiments/search?max_results=1")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert process.poll() is None, tiny_run["log"].read_text()[-2000:]
                assert time.monotonic() < deadline, f"mlflow server not up in {START_S} s"
                time.sleep(1.0)
        yield url


def api(url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One call to the MLflow REST API (GET, or POST with a JSON body), 30 s at most."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        answer: dict[str, Any] = json.loads(reply.read())
        return answer


def artifacts(url: str, run_id: str, path: str = "") -> list[str]:
    """Every artifact file of a run under ``path``, recursively."""
    listed = api(url, f"artifacts/list?run_id={run_id}&path={path}").get("files", [])
    return [name for f in listed for name in (artifacts(url, run_id, f["path"]) if f["is_dir"] else [f["path"]])]


def shown(url: str, name: str, wait_for: list[str], *, ready: str = "", settle_s: float = 0.0) -> Page:
    """Open a UI page at 1280 px, wait for its texts, keep ``test-artifacts/mlflow_<name>.png``; no real errors."""
    page = open_page(url, ARTIFACTS / f"mlflow_{name}.png", height=900, timeout_s=90, wait_for=wait_for,
                     ready=ready, settle_s=settle_s)
    assert [e for e in page.errors if not any(b in e for b in BENIGN)] == [], name
    return page


def test_mlflow_ui_shows_the_pipeline_its_stages_and_reports(tiny_run: dict[str, Any], server: str) -> None:
    parent, experiment = tiny_run["run"], tiny_run["experiment"]
    runs = api(server, "runs/search", {"experiment_ids": [experiment], "max_results": 100})["runs"]
    by_name = {r["info"]["run_name"]: r for r in runs}
    stages = ("vae", "image_flow", "reid", "video_flow", "ef")
    children = {r["info"]["run_name"] for r in runs
                if {"key": "mlflow.parentRunId", "value": parent} in r["data"].get("tags", [])}
    assert children >= {f"federate-{s}" for s in stages}
    # the parent: the whole config as params, the headline metrics, the reports and their previews as artifacts
    top = by_name["pipeline"]["data"]
    assert len(top["params"]) > 100 and {"key": "seed", "value": "0"} in top["params"]
    assert {"parity.real.pooled.mae", "parity.synthetic.pooled.mae", "released", "consistency_r2"} <= {
        m["key"] for m in top["metrics"]}
    files = artifacts(server, parent)
    for name in ("audit/audit.html", "audit/audit.json", "audit/similarity.png", "summary/summary.html",
                 "summary/loss_curves.png", "summary/ef_scatter.png", "config.yaml"):
        assert name in files, name
    assert [f for f in files if f.startswith("audit/previews/") and f.endswith(".gif")]
    assert [f for f in files if f.startswith("summary/previews/") and f.endswith(".gif")]
    # a nested stage: its sites' per-step training curve (1 round x 3 local steps in TINY)
    vae = by_name["federate-vae"]["info"]["run_id"]
    history = api(server, f"metrics/get-history?run_id={vae}&metric_key=site_00/train_loss_step")["metrics"]
    assert sorted(m["step"] for m in history) == [1, 2, 3]

    base = f"{server}/#/experiments/{experiment}"
    shown(f"{base}/runs", "runs", ["pipeline", "matching runs"])
    overview = shown(f"{base}/runs/{parent}", "parent", ["pipeline", "parity.real.pooled.mae", "Parameters"])
    assert "consistency_r2" in overview.text
    nested = shown(f"{base}/runs/{vae}", "nested", ["federate-vae", "site_00/train_loss_step", "Parameters"])
    assert "site_01/train_loss_step" in nested.text and "local-steps" in nested.text
    # a report opens in the UI's preview: a sandboxed frame whose text cannot be read, so its pixels are checked
    for name in ("summary", "audit"):
        for attempt in range(3):  # the UI may still re-render when the frame first appears (busy machine)
            listing = shown(f"{base}/runs/{parent}/artifacts/{name}/{name}.html", name, [f"{name}/{name}.html"],
                            ready=PREVIEW_FRAME, settle_s=3.0 * (attempt + 1))
            preview = np.asarray(Image.open(ARTIFACTS / f"mlflow_{name}.png").convert("L"))[220:800, 440:900]
            if preview.std() > 10:
                break
        assert preview.std() > 10, f"{name}.html: the preview stayed blank"
        assert f"{name}.json" in listing.text and "previews" in listing.text
