"""A real deployment on 127.0.0.1: SuperLink (TLS, node authentication) + 2 SuperNodes run 2 toy rounds (slow)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from echoflow.server.checkpoint import load_latest
from tests.federation.processes import REPO, free_port, process_pool

DEPLOY = REPO / "deploy"


def wait_for(condition: object, *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(1.0)


@pytest.mark.slow
def test_superlink_and_two_supernodes_with_tls_and_node_auth_run_two_rounds(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    subprocess.run([str(DEPLOY / "certificates.sh"), str(certs), "2"], check=True, capture_output=True)
    port = free_port()
    env = os.environ | {"FLWR_HOME": str(tmp_path / "flwr"), "PYTHONPATH": str(REPO)}  # the toy task lives in tests/
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n')
    (tmp_path / "run.toml").write_text(
        'task = "tests.federation.toy:TASK"\nstage = "toy"\nconfig-json = "{\\"n\\": 64}"\nrounds = 2\n'
        f'local-steps = 5\ndata-root = "{tmp_path / "cohort"}"\ncheckpoint-dir = "{tmp_path / "ckpt"}"\n')
    with process_pool(env) as start:
        link = start(["flower-superlink", "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile",
                      str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
                      "--disable-runtime-dependency-installation", "--port", str(port)], tmp_path / "link.log")
        wait_for(lambda: "Uvicorn running on https" in (tmp_path / "link.log").read_text(), timeout_s=60,
                 what="SuperLink start")
        for site in (0, 1):
            subprocess.run(["flwr", "supernode", "register", str(certs / f"site_{site:02d}.pub"), "local"], env=env,
                           check=True, capture_output=True, timeout=60)
            start(["flower-supernode", "--root-certificates", str(certs / "ca.crt"), "--superlink",
                   f"127.0.0.1:{port}", "--auth-supernode-private-key", str(certs / f"site_{site:02d}"), "--port",
                   str(free_port()), "--node-config", f"partition-id={site}"], tmp_path / f"node{site}.log")
        run = subprocess.run(["flwr", "run", str(DEPLOY), "local", "--run-config", str(tmp_path / "run.toml")],
                             env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and "Successfully started run" in run.stdout, run.stdout + run.stderr
        wait_for(lambda: (s := load_latest(tmp_path / "ckpt")) is not None and s.round == 2, timeout_s=420,
                 what="round 2 checkpoint")
        assert link.poll() is None
    state = load_latest(tmp_path / "ckpt")
    assert state is not None and [sorted(e["sites"]) for e in state.history] == [["0", "1"], ["0", "1"]]
    assert all("eval-loss" in site for e in state.history for site in e["sites"].values())
