"""Kill the server process of a real `echoflow simulate` with SIGKILL mid-run; the same command resumes (slow).

The resumed federation ends with the very weights of an uninterrupted run with the same seed: sites seed
every step from (seed, site, step), the strategy's state is checkpointed, and the server aggregates the
replies in site order whatever order they arrive in.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from echoflow.server.checkpoint import load_latest
from tests.federation.processes import REPO, alive, descendants, process_pool, ray_processes

ROUNDS = 4


def simulate_argv(tmp: Path) -> list[str]:
    return ["echoflow", "simulate", "stage=vae", "federation.task=tests.federation.toy:TASK",
            "federation.sites=2", f"federation.rounds={ROUNDS}", "federation.local_steps=20", "federation.num_cpus=1",
            "data.sites=2", "data.patients_per_site=1", "data.size=32", "data.frames=16", f"workdir={tmp}",
            f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}"]


@pytest.mark.slow
def test_sigkilled_server_resumes_from_its_last_round(tmp_path: Path) -> None:
    checkpoints = tmp_path / "federation" / "vae"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    with process_pool(env) as start:
        server = start(simulate_argv(tmp_path), tmp_path / "first.log")
        deadline = time.monotonic() + 300
        while not (checkpoints / "LATEST").exists():
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.1)
        tree = descendants(server.pid) + ray_processes(server.pid)  # before the kill orphans them
        os.killpg(server.pid, signal.SIGKILL)
        for pid in tree:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        server.wait(timeout=30)
    assert server.returncode == -signal.SIGKILL
    assert not ray_processes(server.pid), "the killed server's Ray session is still running"
    killed = load_latest(checkpoints)
    assert killed is not None and 1 <= killed.round < ROUNDS

    with process_pool(env) as start:
        second = start(simulate_argv(tmp_path), tmp_path / "second.log")
        assert second.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()
    deadline = time.monotonic() + 30  # `ray.shutdown()` returns before every Ray process has exited
    while ray_processes(second.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes(second.pid), "the resumed run left Ray processes behind"
    final = load_latest(checkpoints)
    assert final is not None and final.round == ROUNDS
    assert [e["round"] for e in final.history] == list(range(1, ROUNDS + 1))
    assert final.history[: killed.round] == killed.history  # resumed after the last round, not restarted
    assert final.mlflow_run_id == killed.mlflow_run_id

    with process_pool(env) as start:
        straight_dir = tmp_path / "straight"
        straight = start(simulate_argv(straight_dir), tmp_path / "straight.log")
        assert straight.wait(timeout=400) == 0, (tmp_path / "straight.log").read_text()
    uninterrupted = load_latest(straight_dir / "federation" / "vae")
    assert uninterrupted is not None and uninterrupted.arrays.keys() == final.arrays.keys()
    assert all(torch.equal(uninterrupted.arrays[k], final.arrays[k]) for k in final.arrays)
