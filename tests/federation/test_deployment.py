"""Deployment: earlier stages' weights travel in messages (no folder shared with the server), and a real
deployment on 127.0.0.1: SuperLink (TLS, node authentication) + SuperNodes, each in its own folder (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import echoflow.federation.echo_task as echo_task
from echoflow.audit.federated import SiteAuditor
from echoflow.audit.run import AuditSettings, embed_sites
from echoflow.cli import app
from echoflow.clients.policy import setup_of
from echoflow.config import load_config, plain
from echoflow.data.phantom import generate_cohort
from echoflow.data.sites import load_site
from echoflow.errors import EchoFlowError
from echoflow.federation.config import run_config
from echoflow.federation.echo_task import TASK
from echoflow.federation.task import group_arrays
from echoflow.server import loop
from echoflow.server.checkpoint import FederationState, load_latest, save_round
from echoflow.server.settings import ServerSettings
from echoflow.stages.networks import build_network, load_network, save_network
from tests.federation.grid import LocalGrid
from tests.federation.processes import REPO, free_port, process_pool
from tests.test_pipeline import TINY as PIPELINE_TINY

DEPLOY = REPO / "deploy"


def wait_for(condition: object, *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(1.0)


def test_the_global_vae_travels_in_messages_and_sites_never_read_the_server_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Federate image_flow (1 round) over an in-process grid; a site that opened a checkpoint folder would fail."""
    cfg = load_config(["data.size=32", "data.frames=16", "model.vae.base_channels=4", "model.image_flow.channels=[4,8]",
                       "model.discriminator.base_channels=4", f"workdir={tmp_path}/server",
                       f"federation.checkpoint_dir={tmp_path}/server/federation", "federation.sites=2",
                       "federation.rounds=1", "federation.local_steps=2", "federation.batch_size=4",
                       "federation.evaluate=false", "mlflow.tracking_uri="])
    generate_cohort(tmp_path / "sites", sites=2, patients_per_site=2, seed=0, size=32, frames=16)
    config = run_config(cfg, stage="image_flow", stage_checkpoints={"vae": f"{tmp_path}/server/federation/vae"}) | {
        "data-root": str(tmp_path / "sites")}
    task_config = json.loads(config["config-json"])
    torch.manual_seed(0)
    vae = group_arrays(TASK.build_stage("vae", task_config))
    save_round(tmp_path / "server" / "federation" / "vae", FederationState(round=1, arrays=vae))
    received: list[dict[str, torch.Tensor]] = []
    monkeypatch.setattr(echo_task, "global_network", lambda *a: pytest.fail(f"a site read a server folder: {a}"))
    monkeypatch.setattr(echo_task, "recall", lambda stage, key, recall=echo_task.recall: received.append(
        recall(stage, key)) or received[-1])
    grid = LocalGrid(2, node_config=setup_of(config))
    try:
        state = loop.run_federation(grid, ServerSettings.from_run_config(config), config)
    finally:
        grid.close()
    assert state.round == 1 and sorted(state.history[0]["sites"]) == [0, 1] and state.history[0]["trained"] == 2
    # each site encoded its latents with exactly the server's global VAE (its model group), received by message
    assert len(received) == 2 and all(set(r) == {k for k in vae if k.startswith("model.")} for r in received)
    assert all(torch.equal(r[k], vae[k]) for r in received for k in r)
    with pytest.raises(EchoFlowError, match=r"stage_checkpoints\.vae"):  # without the message, the folder it is
        shutil.rmtree(tmp_path / "server")
        TASK.site_data("image_flow", tmp_path / "sites" / "site_00", task_config)


def test_a_site_builds_its_audit_index_from_its_own_folder(tmp_path: Path) -> None:
    overrides = [f"workdir={tmp_path}/models", "data.size=32", "model.vae.base_channels=8", "model.reid.channels=8",
                 "model.reid.dim=16"]
    cfg = load_config(overrides)
    torch.manual_seed(0)
    for stage in ("vae", "reid"):
        save_network(build_network(stage, plain(cfg.model)), tmp_path / "models" / stage / "model.safetensors")
    site = generate_cohort(tmp_path / "hospital", sites=1, patients_per_site=4, seed=3, size=32, frames=12)[0]
    result = CliRunner().invoke(app, ["audit", "index", "--site", str(site), *overrides])
    assert result.exit_code == 0, result.output
    auditor = SiteAuditor.load(site / "audit_index")
    train = load_site(site, size=32, splits=["TRAIN"])
    heldout = load_site(site, size=32, splits=["VAL", "TEST"])
    assert auditor.index.ntotal == sum(len(v) for v in train.videos) and len(auditor.heldout) == sum(
        len(v) for v in heldout.videos)  # every TRAIN frame indexed; every held-out frame kept for calibration
    vae, reid = (load_network(s, plain(cfg.model), tmp_path / "models" / s / "model.safetensors")
                 for s in ("vae", "reid"))
    expected = embed_sites(vae, reid, [train], [heldout], AuditSettings())[train.name]  # type: ignore[arg-type]
    assert np.allclose(auditor.index.vectors(), expected.train.vectors, atol=1e-5)
    assert f"{auditor.index.ntotal} TRAIN frames" in result.output
    missing = CliRunner().invoke(app, ["audit", "index", "--site", str(tmp_path / "nowhere"), *overrides])
    assert missing.exit_code != 0 and "nowhere" in str(missing.exception or missing.output)


@pytest.mark.slow
def test_stage_all_deployed_with_each_supernode_in_its_own_folder_and_no_path_in_common(tmp_path: Path) -> None:
    """SuperLink + 2 SuperNodes (TLS, node auth) federate all five stages in one `flwr run`.

    The server, the operator and each node work in their own folder; a site's data lives only in its node's
    folder, and the server's checkpoints only in the server's. The latent stages get the global VAE in messages.
    Each node names its own data (node 0 its `site-dir`, node 1 a `data-root` holding `site_01`) and node 0 its
    task. Federated evaluation is off: the same ClientApp code is evaluated in simulation, and each exchange here
    costs Flower's 3-s polls on both sides plus a ClientApp process.
    """
    server, nodes = tmp_path / "server", [tmp_path / f"node{i}" for i in (0, 1)]
    certs = server / "certs"
    server.mkdir()
    subprocess.run([str(DEPLOY / "certificates.sh"), str(certs), "2"], check=True, capture_output=True)
    sites = generate_cohort(tmp_path / "phantom", sites=2, patients_per_site=8, seed=0, size=64, frames=32)
    for node, site in zip(nodes, sites, strict=True):
        (node / "data").mkdir(parents=True)
        shutil.move(str(site), node / "data" / site.name)  # the site's videos exist only in its node's folder
    shutil.rmtree(tmp_path / "phantom")
    overrides = [o for o in PIPELINE_TINY if not o.startswith("pipeline.")] + [
        f"workdir={server}/work", f"federation.checkpoint_dir={server}/federation", "federation.rounds=1",
        "federation.local_steps=3", "federation.evaluate=false", "mlflow.tracking_uri=", "stage=all"]
    exported = CliRunner().invoke(app, ["simulate", "--export-run-config", str(server / "run.toml"), *overrides])
    assert exported.exit_code == 0, exported.output
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(REPO), "ECHOFLOW_QUIET": "1"}
    homes = {place: place / "flwr" for place in (server, *nodes)}
    for home in homes.values():
        home.mkdir(parents=True)
    (homes[server] / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n')
    operator = env | {"FLWR_HOME": str(homes[server])}
    with process_pool(env) as start:
        start(["flower-superlink", "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile",
               str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
               "--disable-runtime-dependency-installation", "--port", str(port)], server / "link.log", cwd=server,
              env_extra={"FLWR_HOME": str(homes[server])})
        wait_for(lambda: "Uvicorn running on https" in (server / "link.log").read_text(), timeout_s=60,
                 what="SuperLink start")
        for i, node in enumerate(nodes):
            shutil.copy(certs / f"site_{i:02d}", node / "key")
            shutil.copy(certs / f"site_{i:02d}.pub", node / "key.pub")
            shutil.copy(certs / "ca.crt", node / "ca.crt")
            subprocess.run(["flwr", "supernode", "register", str(node / "key.pub"), "local"], env=operator,
                           check=True, capture_output=True, timeout=60)
            data = (f'site-dir="{node / "data" / sites[i].name}" task="{echo_task.__name__}:TASK"' if i == 0
                    else f'data-root="{node / "data"}"')
            node_config = f'partition-id={i} {data} state-dir="{node / "state"}"'
            start(["flower-supernode", "--root-certificates", str(node / "ca.crt"), "--superlink",
                   f"127.0.0.1:{port}", "--auth-supernode-private-key", str(node / "key"), "--port",
                   str(free_port()), "--node-config", node_config], node / "node.log", cwd=node,
                  env_extra={"FLWR_HOME": str(homes[node])})
        run = subprocess.run(["flwr", "run", str(DEPLOY), "local", "--run-config", str(server / "run.toml")],
                             env=operator, capture_output=True, text=True, timeout=60, cwd=server)
        assert run.returncode == 0 and "Successfully started run" in run.stdout, run.stdout + run.stderr
        wait_for(lambda: (s := load_latest(server / "federation" / "ef")) is not None and s.round == 1,
                 timeout_s=1500, what="the last stage's round")
    for stage in ("vae", "image_flow", "reid", "video_flow", "ef"):
        state = load_latest(server / "federation" / stage)
        assert state is not None and state.history[0]["trained"] == 2, stage
    assert not (server / "work" / "cohort").exists()  # the server never had the sites' data
    assert str(tmp_path / "node") not in (server / "run.toml").read_text()  # nor did its run config name a site path
