"""The federated VAE's ``latent_scale``: 1 / std of the latent means over every site's frames, pooled exactly.

Each site reports three scalars (count, mean, population variance of its latent means under the final global
VAE; `echoflow.clients.moments.latent_moments`); the server pools them — within-site plus between-site
variance — which equals what `echoflow.models.vae.measure_latent_scale` would measure on all frames at once.
Under DP each site's three numbers come from a Gaussian mechanism on its ledger (count = patients, noised).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from echoflow.errors import EchoFlowError
from echoflow.federation.protocol import LATENT_STATS

log = logging.getLogger(__name__)


def pooled_std(moments: Sequence[Mapping[str, float]]) -> float:
    """Sample std of the union of the sites' values from each site's ``count``, ``mean`` and ``var``."""
    n = sum(m["count"] for m in moments)
    if n < 2:
        raise EchoFlowError("latent scale: the sites reported fewer than two latent values")
    mean = sum(m["count"] * m["mean"] for m in moments) / n
    sum_sq = sum(m["count"] * (m["var"] + (m["mean"] - mean) ** 2) for m in moments)
    std = math.sqrt(sum_sq / (n - 1))
    if std == 0.0:
        raise EchoFlowError("latent scale: latent means are constant at every site")
    return std


def federated_latent_scale(
    grid: Grid, arrays: Mapping[str, Tensor], config: ConfigRecord, *, timeout_s: float
) -> float:
    """Ask every connected site for its latent moments under ``arrays``; returns 1 / pooled std.

    ``config`` is the stage's run config record (`echoflow.federation.protocol.run_config_record`).

    Raises:
        EchoFlowError: when no site answers.
    """
    content = RecordDict({"arrays": ArrayRecord(dict(arrays)), "config": config})
    messages = [Message(content=content, dst_node_id=node, message_type=f"query.{LATENT_STATS}")
                for node in grid.get_node_ids()]
    moments = []
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        if reply.has_error():
            log.warning("latent scale: site node %d failed: %s", reply.metadata.src_node_id, reply.error.reason)
        else:
            moments.append({k: float(v) for k, v in reply.content["metrics"].items()})  # type: ignore[arg-type]
    if not moments:
        raise EchoFlowError("latent scale: no site reported its latent statistics")
    return 1.0 / pooled_std(moments)
