"""`echoflow simulate` on an existing Ray cluster (`federation.ray_address`): a local head on loopback (slow).

The head runs under `ray start --head --block` in its own session, so stopping it stops exactly its process tree
(never `ray stop`, which would end every Ray process of the user on this machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from echoflow.server.checkpoint import load_latest
from tests.federation.processes import REPO, free_port, process_pool
from tests.federation.test_deployment import wait_for
from tests.test_pipeline import TINY

pytestmark = pytest.mark.slow


def test_simulate_runs_on_a_ray_head_started_with_ray_start(tmp_path: Path) -> None:
    port = free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short
    env = os.environ | {"PYTHONPATH": str(REPO), "ECHOFLOW_QUIET": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    overrides = [o for o in TINY if not o.startswith("pipeline.")] + [
        "stage=vae", f"workdir={tmp_path}/work", f"federation.checkpoint_dir={tmp_path}/federation",
        "federation.rounds=2", "federation.local_steps=2", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db",
        f"federation.ray_address=127.0.0.1:{port}"]
    try:
        with process_pool(env) as start:
            start(["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                   "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
                  tmp_path / "head.log")
            wait_for(lambda: "Ray runtime started" in (tmp_path / "head.log").read_text(), timeout_s=120,
                     what="ray head start")
            run = subprocess.run(["echoflow", "simulate", *overrides], env=env, capture_output=True, text=True,
                                 timeout=900, cwd=tmp_path)
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            # the driver joined the running head instead of starting its own Ray: the sites' actors ran there
            logs = [p for p in (ray_tmp / "session_latest" / "logs").glob("*") if p.is_file()]
            assert any(b"ClientAppActor" in p.read_bytes() for p in logs), sorted(p.name for p in logs)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    state = load_latest(tmp_path / "federation" / "vae")
    assert state is not None and state.round == 2
    assert all(sorted(entry["sites"]) == ["0", "1"] and entry["trained"] == 2 for entry in state.history)
