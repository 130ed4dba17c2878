"""A site's own policy: the code it runs, its data, its DP — read from its node config — and the messages it refuses.

Threat model: the server is honest-but-curious and writes every message a site receives. So nothing
privacy-relevant comes from a message: the task the site runs (an import path: code), its data folder, its
training config, DP on/off, the target (ε, δ), the clipping norm C, the plan that splits ε over the stages, the
steps planned per stage and the randomness of noise and sampling are the site's node config (a SuperNode's
``--node-config``; in simulation, what the launcher bakes into each site's ClientApp — never the run config the
messages carry). The run config still *states* what the server expects; a site whose setup or policy differs, or
a stage that would train more steps than the site planned, is refused with the reason, which the server's round
records apart from missing sites (its ``refused``, `echoflow.server.roster`).

Node-config keys: the setup — ``task`` (default `DEFAULT_TASK`), ``data-root`` (the site reads
``<data-root>/site_<id:02d>``) or ``site-dir``, ``config-json`` (the resolved EchoFlow config it trains with;
only the per-stage keys `SERVER_CONFIG_KEYS` come from the message; without it, the message's config) — and the
DP policy — ``dp-enabled``, ``dp-epsilon``, ``dp-delta`` (0 = 0.1 / the site's patients), ``dp-max-grad-norm``,
``dp-plan`` (JSON ``{stage: share of ε}``, shares sum to ≤ 1), ``dp-planned-steps`` (JSON
``{stage: rounds × local steps}``) and, for a reproducible simulation only, ``dp-secret-seed``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from echoflow.errors import EchoFlowError

#: The keys of a site's DP policy; a run config (a message) carrying the secret seed is refused outright.
POLICY_KEYS = ("dp-enabled", "dp-epsilon", "dp-delta", "dp-max-grad-norm", "dp-plan", "dp-planned-steps",
               "dp-secret-seed")
#: The keys of a site's setup (its code path, data and training config), its own in its node config.
SETUP_KEYS = ("task", "data-root", "config-json")
#: The task a site runs when its node config names none: the EchoFlow stages installed at the site.
DEFAULT_TASK = "echoflow.federation.echo_task:TASK"
#: Top-level keys of the training config that are the server's per stage (its rounds and steps, its checkpoint
#: folders); every other key is the site's own (``config-json`` in its node config).
SERVER_CONFIG_KEYS = ("federation", "stage_checkpoints")


def setup_of(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The setup keys of a run config: what a launcher gives the sites it launches as their own node config."""
    return {key: run_config[key] for key in SETUP_KEYS if key in run_config}


class PolicyRefusal(EchoFlowError):
    """A site refuses a message that would weaken its privacy policy or change its setup."""


@dataclass(frozen=True)
class RunRequest:
    """What a message's run config asks of the site's setup and DP (None: the message does not say)."""

    enabled: bool | None = None
    epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float | None = None
    task: str | None = None
    data_root: str | None = None
    config: dict[str, Any] | None = None

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunRequest:
        """The setup and ``dp-*`` keys of a run config."""
        if "dp-secret-seed" in run_config:
            raise EchoFlowError("run_config: 'dp-secret-seed' is a site's own setting (its node config); "
                                "a message cannot set a site's noise randomness")

        def number(key: str) -> float | None:
            return float(run_config[key]) if key in run_config else None

        def text(key: str) -> str | None:  # "" (a deployed app's declared default) does not say
            return str(run_config[key]) if run_config.get(key, "") != "" else None

        enabled = bool(run_config["dp-enabled"]) if "dp-enabled" in run_config else None
        config = _config(run_config, "run_config") if "config-json" in run_config else None
        return cls(enabled=enabled, epsilon=number("dp-epsilon"), delta=number("dp-delta"),
                   max_grad_norm=number("dp-max-grad-norm"), task=text("task"), data_root=text("data-root"),
                   config=config)


@dataclass(frozen=True)
class SitePolicy:
    """A site's setup and DP policy for the whole run (see the module docstring for the node-config keys).

    Attributes:
        task: the task's import path. data_root: the folder of the sites' data folders (None: the node config
        names its ``site-dir`` instead). config: the training config (None: the message's).
        enabled: DP-SGD on. epsilon: target ε over the whole run, all stages. delta: target δ (0 = 0.1 / the
        site's patients). max_grad_norm: per-patient clipping norm C. plan: stage -> share of ε.
        planned_steps: stage -> DP steps planned (the noise is calibrated for them). secret_seed: a fixed seed
        for the noise and sampling generator (reproducible simulation only); None = OS randomness.
    """

    enabled: bool = False
    epsilon: float = 0.0
    delta: float = 0.0
    max_grad_norm: float = 1.0
    plan: dict[str, float] = field(default_factory=dict)
    planned_steps: dict[str, int] = field(default_factory=dict)
    secret_seed: int | None = None
    task: str = DEFAULT_TASK
    data_root: str | None = None
    config: dict[str, Any] | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SitePolicy:
        """Parse the site's node config; no ``dp-enabled`` (or false) means no DP."""
        setup = cls(task=str(node_config.get("task") or DEFAULT_TASK),
                    data_root=str(node_config["data-root"]) if node_config.get("data-root") else None,
                    config=_config(node_config, "node_config") if "config-json" in node_config else None)
        if not bool(node_config.get("dp-enabled", False)):
            return setup
        try:
            plan = {str(k): float(v) for k, v in _json(node_config, "dp-plan").items()}
            steps = {str(k): int(v) for k, v in _json(node_config, "dp-planned-steps").items()}
            policy = replace(setup, enabled=True, epsilon=float(node_config["dp-epsilon"]),
                             delta=float(node_config.get("dp-delta", 0.0)),
                             max_grad_norm=float(node_config.get("dp-max-grad-norm", 1.0)), plan=plan,
                             planned_steps=steps, secret_seed=int(node_config["dp-secret-seed"])
                             if "dp-secret-seed" in node_config else None)
        except KeyError as err:
            raise EchoFlowError(f"node_config: DP is on but {err} is not set") from err
        except (TypeError, ValueError) as err:
            raise EchoFlowError(f"node_config: malformed DP policy ({err})") from err
        if policy.epsilon <= 0 or policy.max_grad_norm <= 0:
            raise EchoFlowError(f"node_config: dp-epsilon and dp-max-grad-norm must be > 0, got "
                                f"{policy.epsilon} and {policy.max_grad_norm}")
        if any(share < 0 for share in plan.values()) or sum(plan.values()) > 1.0 + 1e-9:
            raise EchoFlowError(f"node_config: dp-plan shares must be >= 0 and sum to <= 1, got {plan}")
        return policy

    def delta_for(self, n_patients: int) -> float:
        """The δ of a site with ``n_patients`` patients (the unit of privacy)."""
        return self.delta if self.delta > 0 else 0.1 / max(n_patients, 1)

    def training_config(self, request: RunRequest) -> dict[str, Any]:
        """The config the site trains with: its own, with the message's per-stage `SERVER_CONFIG_KEYS`."""
        asked = request.config or {}
        if self.config is None:
            return dict(asked)
        return {**self.config, **{key: asked[key] for key in SERVER_CONFIG_KEYS if key in asked}}

    def setup_refusal(self, request: RunRequest) -> str | None:
        """Why the site refuses a message naming another task, data folder or training config than its own."""
        if request.task is not None and request.task != self.task:
            return f"the run asks task {request.task!r}; this site runs {self.task!r} (its node config)"
        if request.data_root is not None and self.data_root is not None and request.data_root != self.data_root:
            return f"the run asks data-root {request.data_root!r}; this site reads only its own data folder"
        if request.config is not None and self.config is not None:
            where = _difference(self.config, request.config, skip=SERVER_CONFIG_KEYS)
            if where is not None:
                return f"the run's config differs from this site's own at {where!r}"
        return None

    def refusal(self, request: RunRequest, *, stage: str, rounds: int, local_steps: int) -> str | None:
        """Why the site refuses to train ``stage`` for ``rounds`` x ``local_steps`` as ``request`` asks, or None."""
        if (setup := self.setup_refusal(request)) is not None:
            return setup
        if not self.enabled:
            return "the run asks for DP; this site's policy is DP off" if request.enabled else None
        if request.enabled is False:
            return f"the run asks DP off; this site's policy is DP on (ε={self.epsilon:g})"
        if request.epsilon is not None and request.epsilon != self.epsilon:
            return f"the run asks ε={request.epsilon:g}; this site's policy is ε={self.epsilon:g}"
        if request.delta is not None and request.delta != self.delta:
            return f"the run asks δ={request.delta:g}; this site's policy is δ={self.delta:g}"
        if request.max_grad_norm is not None and request.max_grad_norm != self.max_grad_norm:
            return (f"the run asks clipping norm C={request.max_grad_norm:g}; this site's policy is "
                    f"C={self.max_grad_norm:g}")
        if stage not in self.plan or stage not in self.planned_steps:
            return f"stage {stage!r} has no share in this site's dp-plan / dp-planned-steps"
        if rounds * local_steps > self.planned_steps[stage]:
            return (f"the run asks {rounds} x {local_steps} = {rounds * local_steps} steps of {stage}, more than "
                    f"the {self.planned_steps[stage]} planned")
        return None


def secret_generator(policy: SitePolicy, *, stage: str, server_round: int) -> torch.Generator:
    """The generator of a DP round's Poisson sampling and noise: secret from the server.

    Seeded from the OS's cryptographic randomness, unless the site's own config sets ``dp-secret-seed`` (a
    reproducible simulation), in which case from a hash of that seed, the stage and the round.
    """
    if policy.secret_seed is None:
        seed = secrets.randbits(63)
    else:
        digest = hashlib.sha256(f"{policy.secret_seed}/{stage}/{server_round}".encode()).digest()
        seed = int.from_bytes(digest[:8], "big") >> 1
    return torch.Generator().manual_seed(seed)


def _config(user_config: Mapping[str, Any], where: str) -> dict[str, Any]:
    try:
        config = json.loads(str(user_config["config-json"]))
    except json.JSONDecodeError as err:
        raise EchoFlowError(f"{where}: config-json is not JSON ({err})") from err
    if not isinstance(config, dict):
        raise EchoFlowError(f"{where}: config-json is not a JSON object")
    return config


def _difference(own: Any, asked: Any, *, skip: tuple[str, ...] = (), at: str = "") -> str | None:
    """The first dotted key at which ``asked`` differs from ``own`` (top-level ``skip`` keys aside), or None."""
    if isinstance(own, dict) and isinstance(asked, dict):
        for key in sorted(set(own) | set(asked), key=str):
            if key in skip:
                continue
            if key not in own or key not in asked:
                return f"{at}{key}"
            if (where := _difference(own[key], asked[key], at=f"{at}{key}.")) is not None:
                return where
        return None
    return None if own == asked else at.removesuffix(".") or "(root)"


def _json(node_config: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = node_config[key]
    parsed = json.loads(value) if isinstance(value, str) else dict(value)
    if not isinstance(parsed, dict):
        raise ValueError(f"{key} is not a JSON object")
    return parsed
