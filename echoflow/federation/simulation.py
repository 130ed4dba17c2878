"""Run a federation in Flower's simulation engine on Ray: locally (default) or on a Ray cluster.

Scriptable from Python and leaves nothing running: the engine starts Ray, and Ray is shut down on the way
out whatever happens. The same ClientApp/ServerApp run unchanged under a SuperLink in deployment; only the
run config's origin differs (here: the apps' defaults, since the engine passes none).

Resources: each simulated site asks Ray for ``client_cpus`` CPUs, so ``num_cpus / client_cpus`` sites train
at once and the rest queue; sites are stateless between messages (their ledgers travel in the node
context), so 10–20 sites share two cores and a handful of actor processes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echoflow.clients.app import make_client_app
from echoflow.clients.faults import FAULT_PLAN
from echoflow.clients.policy import setup_of
from echoflow.errors import EchoFlowError
from echoflow.server.app import make_server_app
from echoflow.server.checkpoint import FederationState, load_latest


@dataclass(frozen=True)
class SimulationConfig:
    """Where and how the simulated sites run.

    Attributes:
        sites: number of simulated sites (SuperNodes); site i reads ``<data-root>/site_<i:02d>``.
        client_cpus: Ray CPUs reserved per site while it trains (1 = one core per site).
        num_cpus: CPUs Ray may use locally (0 = all). ray_address: an existing Ray cluster ('' = local).
        object_store_mb: Ray object store size for a local Ray, MiB. verbose: Flower's INFO logs.
    """

    sites: int
    client_cpus: float = 1.0
    num_cpus: int = 0
    ray_address: str = ""
    object_store_mb: int = 256
    verbose: bool = False


def simulate(run_config: Mapping[str, Any], sim: SimulationConfig, *,
             site_config: Mapping[str, Any] | None = None) -> FederationState:
    """Run (or resume) the federation described by ``run_config``; returns its final state.

    ``site_config``: what every site holds as its own node config (its DP policy, `federation.config.site_config`).

    Raises:
        EchoFlowError: when the run config is incomplete or the federation wrote no checkpoint.
    """
    return simulate_stages([run_config], sim, site_config=site_config)[0]


def simulate_stages(run_configs: Sequence[Mapping[str, Any]], sim: SimulationConfig, *,
                    site_config: Mapping[str, Any] | None = None) -> list[FederationState]:
    """Run (or resume) one federation per run config, in order, in one simulation; returns their final states.

    ``site_config``: every site's own node config (its setup and DP policy), baked into the ClientApp, never a
    message; without its setup keys (`policy.SETUP_KEYS`), the sites are set up with the first run config's.

    Raises:
        EchoFlowError: when a run config is incomplete or a federation wrote no checkpoint.
    """
    import ray
    from flwr.simulation import run_simulation

    if sim.sites < 1:
        raise EchoFlowError(f"federation.sites: need at least one site, got {sim.sites}")
    for run_config in run_configs:
        if "checkpoint-dir" not in run_config:
            raise EchoFlowError("run_config: missing key 'checkpoint-dir'")
    init_args: dict[str, Any] = {"address": sim.ray_address} if sim.ray_address else {
        "address": "local",  # a fresh local instance, never a `ray start` cluster Ray would otherwise autodetect
        "num_cpus": sim.num_cpus or os.cpu_count() or 1,
        "object_store_memory": sim.object_store_mb * 2**20,
        "include_dashboard": False,
    }
    backend_config = {"client_resources": {"num_cpus": sim.client_cpus, "num_gpus": 0.0}, "init_args": init_args}
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.INFO if sim.verbose else logging.WARNING)
    flwr_logger.addFilter(_no_deprecation_notice)
    faults = any(FAULT_PLAN in run_config for run_config in run_configs)  # test and soak runs only
    # the launcher sets its sites up: what it launches (task, data root, config) unless told their own setup
    own = setup_of(run_configs[0]) | dict(site_config or {})
    try:
        run_simulation(
            server_app=make_server_app(run_configs), client_app=make_client_app(faults=faults, site_config=own),
            num_supernodes=sim.sites, backend_config=backend_config,
        )
    finally:
        flwr_logger.removeFilter(_no_deprecation_notice)
        flwr_logger.setLevel(level)
        if ray.is_initialized():
            ray.shutdown()
    return [final_state(Path(str(run_config["checkpoint-dir"]))) for run_config in run_configs]


def _no_deprecation_notice(record: logging.LogRecord) -> bool:
    """Drop flwr 1.42's notice that `run_simulation` is deprecated: it is still the one scriptable engine entry."""
    return "DEPRECATED FEATURE" not in str(record.msg)


def final_state(checkpoint_dir: Path) -> FederationState:
    """The latest round checkpoint of a federation that has run.

    Raises:
        EchoFlowError: when the federation wrote no checkpoint.
    """
    state = load_latest(checkpoint_dir)
    if state is None:
        raise EchoFlowError(f"{checkpoint_dir}: the federation wrote no checkpoint")
    return state
