"""The client's half of the run config: flat Flower ``run_config`` keys, parsed once into a typed object.

The launcher (`echoflow.federation`) writes these keys; in a deployment they come from the app's
``pyproject.toml`` ``[tool.flwr.app.config]`` plus ``flwr run --run-config`` overrides. A SuperNode's
``node_config`` may set ``site-dir`` (its data), ``state-dir`` (where its privacy ledger lives) and holds the
site's DP policy (`echoflow.clients.policy`: the run config's ``dp-*`` keys are only what the server asks, checked
against it); in simulation the site is ``partition-id`` and its data ``<data-root>/site_<id:02d>``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echoflow.clients.policy import DPRequest, SitePolicy
from echoflow.errors import EchoFlowError

UserConfig = Mapping[str, Any]


@dataclass(frozen=True)
class ClientSettings:
    """What a site needs to train one round.

    Attributes:
        task: dotted path of the `SiteTask`. stage: stage name. config: the resolved EchoFlow config (dict).
        rounds: planned server rounds (with ``local_steps``, the DP calibration horizon).
        local_steps: optimiser steps per round. batch_size: (expected) examples per step. lr: AdamW rate.
        seed: run seed (each site and step derive their own; never the DP noise's). policy: the site's own DP
        policy (node config). request: the DP the message asks for (checked against ``policy``).
        site: site index. site_dir: the site's data folder. state_dir: site-local folder for the privacy
        ledger (survives restarts; node config ``state-dir`` only — a message cannot move a site's ledger),
        or None to keep it only in the node's Flower context.
    """

    task: str
    stage: str
    config: dict[str, Any]
    rounds: int
    local_steps: int
    batch_size: int
    lr: float
    seed: int
    policy: SitePolicy
    request: DPRequest
    site: int
    site_dir: Path
    state_dir: Path | None

    @classmethod
    def from_context(cls, run_config: UserConfig, node_config: UserConfig) -> ClientSettings:
        """Parse ``context.run_config`` and ``context.node_config``."""
        try:
            site = int(node_config.get("site-id", node_config.get("partition-id", -1)))
            if site < 0:
                raise EchoFlowError("node_config: neither 'site-id' nor 'partition-id' is set")
            site_dir = Path(str(node_config.get("site-dir") or Path(str(run_config["data-root"])) / f"site_{site:02d}"))
            state_root = node_config.get("state-dir") or ""
            state_dir = Path(str(state_root)) / f"site_{site:02d}" if state_root else None
            return cls(
                task=str(run_config["task"]),
                stage=str(run_config["stage"]),
                config=json.loads(str(run_config.get("config-json", "{}"))),
                rounds=int(run_config["rounds"]),
                local_steps=int(run_config["local-steps"]),
                batch_size=int(run_config["batch-size"]),
                lr=float(run_config["lr"]),
                seed=int(run_config.get("seed", 0)),
                policy=SitePolicy.from_node_config(node_config),
                request=DPRequest.from_run_config(run_config),
                site=site,
                site_dir=site_dir,
                state_dir=state_dir,
            )
        except KeyError as err:
            raise EchoFlowError(f"run_config: missing key {err}") from err

    def refusal(self) -> str | None:
        """Why this site refuses to train the message's stage under its policy, or None (`SitePolicy.refusal`)."""
        return self.policy.refusal(self.request, stage=self.stage, rounds=self.rounds, local_steps=self.local_steps)
