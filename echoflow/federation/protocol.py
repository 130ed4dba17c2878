"""What the sites and the server say to each other: message actions, config keys and the run-config record.

Both `echoflow.clients` and `echoflow.server` import this module and never each other. Records follow Flower's
Message-API names: ``arrays`` (weights, ``"<group>.<param>"``, see `echoflow.federation.task.group_arrays`),
``metrics`` (a site's reply values, always with its ``site`` index) and ``config`` (the round's settings, with the
stage's whole run config as JSON under `RUN_CONFIG`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Message

LATENT_STATS = "latent_stats"
"""Query action: moments of the global VAE's latents on the site's frames."""
ROLL_CALL = "roll_call"
"""Query action: the site names its index (the server maps node ids to sites)."""
RUN_CONFIG = "run-config"
"""Key of the server's run config (JSON) in a message's ``config`` record."""
SERVER_ROUND = "server-round"
"""``config`` key: the 1-based round number of a train message."""
PROXIMAL_MU = "proximal-mu"
"""``config`` key: FedProx μ of a train message (0 without FedProx)."""
REFUSAL = re.compile(r"site \d+ refuses ")
"""How a site's error reply begins, unwrapped from Flower's error text (`echoflow.server.roster`), when the site
refuses the message under its own policy (`echoflow.clients.settings.ClientSettings.refuse`); the server's round
records such a site as ``refused``."""
ARRAY_KEYS = "array-keys"
"""SecAgg+ FitIns config key: the names of the global arrays, in the order of the legacy parameter list."""


def run_config_record(run_config: Mapping[str, Any]) -> ConfigRecord:
    """The ``config`` record our ServerApp sends with every message: the stage's whole run config, as JSON."""
    return ConfigRecord({RUN_CONFIG: json.dumps(dict(run_config))})


def message_run_config(msg: Message) -> dict[str, Any]:
    """The run config a message carries (empty when its sender sent none)."""
    records = msg.content.config_records
    if "config" not in records or RUN_CONFIG not in records["config"]:
        return {}
    return dict(json.loads(str(records["config"][RUN_CONFIG])))

PRIOR_RECORD = "prior-"
"""Prefix of the extra ``ArrayRecord`` s a message may carry: an earlier stage's final global ``model`` weights
(``prior-vae``), so a site never reads the server's checkpoint folder (`echoflow.federation.priors`)."""
PRIOR_DIGESTS = "prior_weights"
"""Key under which a site adds ``{stage: digest}`` of the priors it received to its task config."""
STAGES_JSON = "stages-json"
"""Run-config key of a deployment that federates several stages in one run: a JSON list of per-stage run configs."""
