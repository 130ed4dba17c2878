"""The site's half of secure aggregation: `secagg_mod` puts the train function under Flower's SecAgg+ mod.

The server half, and the protocol's limits, are in `echoflow.server.secagg`. Flower's ``secaggplus_mod`` runs
the protocol's four stages as ``train`` messages; in the third it calls the train function with legacy
``FitIns`` and expects a ``FitRes`` back. `secagg_mod` translates both ways, so the same Message-API train
function serves plain and secure rounds, and hands SecAgg+ the site's UPDATE ``trained - global``: it is small,
so its quantisation range can be tight. Messages without SecAgg+ configs pass untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Scalar, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from echoflow.federation.protocol import ARRAY_KEYS, PRIOR_RECORD

ClientAppCallable = Callable[[Message, Context], Message]


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Site-side mod: SecAgg+ for train messages that carry its configs, the plain train function otherwise."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return cast(Message, secaggplus_mod(msg, context, lambda m, c: _update_as_fitres(m, c, call_next)))


def _update_as_fitres(msg: Message, context: Context, train: ClientAppCallable) -> Message:
    """Run the Message-API ``train`` on the legacy FitIns and reply its update (weight 1, or 0 without one)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    keys = json.loads(str(config.pop(ARRAY_KEYS)))
    global_arrays = dict(zip(keys, parameters_to_ndarrays(fitins.parameters), strict=True))
    priors = {k: v for k, v in msg.content.array_records.items() if k.startswith(PRIOR_RECORD)}  # kept for the task
    msg.content = RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in global_arrays.items()}),
                              "config": ConfigRecord(cast(dict[str, Any], config)), **priors})
    reply = train(msg, context)
    trained = reply.content.array_records.get("arrays")
    local = trained.to_numpy_ndarrays() if trained is not None else None
    update = [np.zeros_like(v, dtype=np.float64) if local is None else local[i].astype(np.float64) - v
              for i, v in enumerate(global_arrays.values())]
    # a legacy FitRes carries scalars only: the round's training curve (lists) stays at the site under SecAgg+
    metrics = cast(dict[str, Scalar], {k: v for k, v in reply.content["metrics"].items() if not isinstance(v, list)})
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), int(local is not None), metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
