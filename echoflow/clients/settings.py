"""The client's half of the run config: flat Flower ``run_config`` keys, parsed once into a typed object.

The launcher (`echoflow.federation`) writes these keys; in a deployment they come from the app's
``pyproject.toml`` ``[tool.flwr.app.config]`` plus ``flwr run --run-config`` overrides — both the server's. A
SuperNode's ``node_config`` holds what is the site's own (`echoflow.clients.policy`): its task, its data
(``site-dir``, or ``data-root`` with the site at ``<data-root>/site_<id:02d>``), its training config, its DP policy,
and ``state-dir`` (where its privacy ledger lives). The run config's ``task``, ``data-root``, ``config-json`` and
``dp-*`` keys are only what the server asks, checked against them. In simulation the site is ``partition-id``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echoflow.clients.policy import PolicyRefusal, RunRequest, SitePolicy
from echoflow.errors import EchoFlowError

log = logging.getLogger(__name__)

UserConfig = Mapping[str, Any]


@dataclass(frozen=True)
class ClientSettings:
    """What a site needs to train one round.

    Attributes:
        task: dotted path of the `SiteTask` (the site's own). stage: stage name. config: the resolved EchoFlow
        config (dict) the site trains with (`SitePolicy.training_config`).
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
    request: RunRequest
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
            policy, request = SitePolicy.from_node_config(node_config), RunRequest.from_run_config(run_config)
            if node_config.get("site-dir"):
                site_dir = Path(str(node_config["site-dir"]))
            elif policy.data_root is not None:
                site_dir = Path(policy.data_root) / f"site_{site:02d}"
            else:
                raise EchoFlowError("node_config: neither 'site-dir' nor 'data-root' is set (a site reads its own "
                                    "data folder, never one a message names)")
            state_root = node_config.get("state-dir") or ""
            state_dir = Path(str(state_root)) / f"site_{site:02d}" if state_root else None
            return cls(
                task=policy.task,
                stage=str(run_config["stage"]),
                config=policy.training_config(request),
                rounds=int(run_config["rounds"]),
                local_steps=int(run_config["local-steps"]),
                batch_size=int(run_config["batch-size"]),
                lr=float(run_config["lr"]),
                seed=int(run_config.get("seed", 0)),
                policy=policy,
                request=request,
                site=site,
                site_dir=site_dir,
                state_dir=state_dir,
            )
        except KeyError as err:
            raise EchoFlowError(f"run_config: missing key {err}") from err

    def refusal(self, *, training: bool = True) -> str | None:
        """Why this site refuses the message, or None.

        Another task, data folder or config than its own (`SitePolicy.setup_refusal`) and, for training, weaker
        DP or more steps than planned (`SitePolicy.refusal`).
        """
        if not training:
            return self.policy.setup_refusal(self.request)
        return self.policy.refusal(self.request, stage=self.stage, rounds=self.rounds, local_steps=self.local_steps)

    def refuse(self, what: str, *, training: bool = True) -> None:
        """Log and raise `PolicyRefusal` when the site refuses ``what`` (see `refusal`); the error reply names why.

        The text is ``site <i> refuses <what>: <why>``, which the server's round records under ``refused``.
        """
        reason = self.refusal(training=training)
        if reason is not None:
            log.warning("site %d refuses %s: %s", self.site, what, reason)
            raise PolicyRefusal(f"site {self.site} refuses {what}: {reason}")
