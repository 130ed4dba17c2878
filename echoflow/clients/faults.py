"""Fault injection for tests and soak runs: chosen sites crash, hang or send bad updates in chosen rounds.

`inject_faults` is a ClientApp mod that does nothing unless the run config holds ``fault-plan``: JSON
``{"<site>": {"<round>": "<kind>"}}``. Kinds:

- ``crash``: the site raises (an error reply); ``drop``: it crashes in this round and every later one (gone);
- ``hang``: the site answers ``timeout-s`` + `HANG_EXTRA_S` late, after the server has given up on it;
- ``nan``: its weights hold NaN; ``shape``: one tensor has a wrong shape;
- ``scale``: its update ``w - w_global`` is multiplied by ``fault-scale`` (default 100), a poisoning site.

``crash`` and ``drop`` also fail the round's evaluation; the other kinds touch only training replies.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message
from torch import Tensor

from echoflow.errors import EchoFlowError
from echoflow.federation.protocol import SERVER_ROUND

FAULT_PLAN = "fault-plan"  #: run-config key holding the plan (JSON)
FAULT_SCALE = "fault-scale"  #: run-config key: factor of a ``scale`` fault
KINDS = ("crash", "drop", "hang", "nan", "shape", "scale")
HANG_EXTRA_S = 2.0
FaultPlan = dict[str, dict[str, str]]
CallNext = Callable[[Message, Context], Message]


def inject_faults(run_config_of: Callable[[Message, Context], Mapping[str, Any]]) -> Callable[..., Message]:
    """The mod; ``run_config_of(msg, context)`` is the ClientApp's view of the run config."""

    def mod(msg: Message, context: Context, call_next: CallNext) -> Message:
        kind_of_message = msg.metadata.message_type
        run_config = run_config_of(msg, context) if kind_of_message in ("train", "evaluate") else {}
        plan: FaultPlan = json.loads(str(run_config.get(FAULT_PLAN) or "{}"))
        if not plan:
            return call_next(msg, context)
        site = int(str(context.node_config.get("site-id", context.node_config.get("partition-id", -1))))
        server_round = int(str(msg.content.config_records["config"][SERVER_ROUND]))
        kind = fault_at(plan, site, server_round)
        if kind in ("crash", "drop"):
            raise EchoFlowError(f"site {site}: injected {kind} in round {server_round}")
        if kind_of_message != "train" or kind is None:
            return call_next(msg, context)
        if kind == "hang":
            time.sleep(float(run_config.get("timeout-s", 0.0)) + HANG_EXTRA_S)
        reply = call_next(msg, context)
        if kind != "hang" and not reply.has_error() and "arrays" in reply.content.array_records:
            sent = msg.content.array_records["arrays"].to_torch_state_dict()
            returned = reply.content.array_records["arrays"].to_torch_state_dict()
            reply.content["arrays"] = ArrayRecord(corrupt(kind, returned, sent,
                                                          scale=float(run_config.get(FAULT_SCALE, 100.0))))
        return reply

    return mod


def fault_at(plan: Mapping[str, Mapping[str, str]], site: int, server_round: int) -> str | None:
    """The fault planned for ``site`` in ``server_round`` (a ``drop`` lasts from its round on), or None."""
    rounds = plan.get(str(site), {})
    if any(kind == "drop" and int(r) <= server_round for r, kind in rounds.items()):
        return "drop"
    return rounds.get(str(server_round))


def corrupt(
    kind: str, returned: Mapping[str, Tensor], sent: Mapping[str, Tensor], *, scale: float
) -> dict[str, Tensor]:
    """The bad update a site with fault ``kind`` (``nan``, ``shape`` or ``scale``) sends instead of ``returned``."""
    arrays = dict(returned)
    first = next(k for k, v in arrays.items() if v.is_floating_point())
    if kind == "nan":
        arrays[first] = torch.full_like(arrays[first], float("nan"))
    elif kind == "shape":
        arrays[first] = torch.zeros(arrays[first].shape[0] + 1, *arrays[first].shape[1:])
    elif kind == "scale":
        arrays = {k: sent[k] + scale * (v - sent[k]) if v.is_floating_point() else v for k, v in arrays.items()}
    else:
        raise EchoFlowError(f"{FAULT_PLAN}: unknown fault {kind!r} (choose from {', '.join(KINDS)})")
    return arrays


def random_fault_plan(
    *, sites: int, rounds: int, faulty: int, rate: float, kinds: Sequence[str], seed: int
) -> FaultPlan:
    """``faulty`` sites drawn at random, each failing in each round with probability ``rate`` (kind at random)."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise EchoFlowError(f"{FAULT_PLAN}: unknown fault {unknown[0]!r} (choose from {', '.join(KINDS)})")
    rng = random.Random(seed)
    plan: FaultPlan = {}
    for site in sorted(rng.sample(range(sites), faulty)):
        chosen = {str(r): rng.choice(list(kinds)) for r in range(1, rounds + 1) if rng.random() < rate}
        if chosen:
            plan[str(site)] = chosen
    return plan
