"""Gather one round's replies despite faulty sites: attendance, update screening, quorum.

Training: wait (at most the round timeout) until the strategy's ``min_nodes`` sites are connected, send the
round, and keep the valid replies; `echoflow.server.roster` names the missing sites and
`echoflow.server.screening` the rejected updates. The round goes on with the rest when at least
``federation.min_sites`` sites sent a usable reply (an accepted update, or word that their privacy budget is
spent); otherwise it raises, before anything is aggregated or checkpointed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from echoflow.server.roster import Attendance, Roster, require_quorum, roll_call, take_attendance, wait_for_sites
from echoflow.server.screening import screen_replies, site_order
from echoflow.server.settings import ServerSettings


@dataclass(frozen=True)
class Training:
    """What a round's training phase brought back.

    Attributes:
        replies: every valid reply (also those of sites whose budget is spent). updates: the accepted updates,
        by site, for the strategy. missing: site label -> why it is absent. rejected: label -> why its update
        was not aggregated. arrays: the weights a cyclic round ended with (they replace aggregation), else None.
        refused: label -> why the site refused to train (its own policy).
    """

    replies: list[Message]
    updates: list[Message]
    missing: dict[str, str]
    rejected: dict[str, str]
    arrays: dict[str, Tensor] | None = None
    refused: dict[str, str] = field(default_factory=dict)


def sample_training(
    grid: Grid, strategy: Strategy, arrays: Mapping[str, Tensor], config: ConfigRecord, roster: Roster, *,
    server_round: int, settings: ServerSettings,
) -> tuple[list[int], list[Message]]:
    """Wait for enough sites, let the strategy sample them, and name every sampled node before it can fail.

    Returns the connected node ids and the training messages (not yet sent); plain and SecAgg+ rounds share it.
    """
    connected = wait_for_sites(grid, int(getattr(strategy, "min_available_nodes", 1)), timeout_s=settings.timeout_s,
                               server_round=server_round)
    sent = list(strategy.configure_train(server_round, ArrayRecord(dict(arrays)), config, grid))
    roll_call(grid, config, timeout_s=settings.timeout_s, roster=roster, nodes=[m.metadata.dst_node_id for m in sent])
    return connected, sent


def gather_training(
    grid: Grid, strategy: Strategy, arrays: Mapping[str, Tensor], config: ConfigRecord, roster: Roster, *,
    server_round: int, settings: ServerSettings,
) -> Training:
    """Run the training phase of ``server_round`` from the global ``arrays``; raise when too few sites answer."""
    connected, sent = sample_training(grid, strategy, arrays, config, roster, server_round=server_round,
                                      settings=settings)
    attendance = take_attendance(sent, grid.send_and_receive(sent, timeout=settings.timeout_s), roster,
                                 connected=connected, phase="train", timeout_s=settings.timeout_s)
    updates, rejected, exhausted = screen_attendance(attendance, arrays, server_round=server_round, settings=settings)
    require_quorum(server_round, usable=len(updates) + exhausted, sampled=len(sent), min_sites=settings.min_sites,
                   missing=attendance.missing, rejected=rejected, refused=attendance.refused)
    return Training(replies=attendance.replies, updates=updates, missing=attendance.missing, rejected=rejected,
                    refused=attendance.refused)


def screen_attendance(
    attendance: Attendance, arrays: Mapping[str, Tensor], *, server_round: int, settings: ServerSettings,
) -> tuple[list[Message], dict[str, str], int]:
    """Screen the updates of a training phase's replies against ``arrays``.

    Returns the accepted updates, label -> why rejected, and how many sites answered that their budget is spent.
    """
    trained = [(reply, label) for reply, label in zip(attendance.replies, attendance.labels, strict=True)
               if not reply.content["metrics"].get("budget-exhausted", 0.0)]
    updates, rejected = screen_replies([r for r, _ in trained], [label for _, label in trained], arrays,
                                       max_ratio=settings.max_update_ratio, server_round=server_round)
    return updates, rejected, len(attendance.replies) - len(trained)


def gather_cyclic_training(
    grid: Grid, strategy: Strategy, arrays: Mapping[str, Tensor], config: ConfigRecord, roster: Roster, *,
    server_round: int, settings: ServerSettings,
) -> Training:
    """Cyclic weight transfer: the sampled sites train in turn, each from the previous usable reply's weights.

    Site order, starting one site later each round (so no site always has the last word). A site that fails,
    has spent its budget or sends an update that fails screening is passed over.
    """
    connected, sent = sample_training(grid, strategy, arrays, config, roster, server_round=server_round,
                                      settings=settings)
    order = sorted(sent, key=lambda message: site_order(roster.label(message.metadata.dst_node_id)))
    shift = (server_round - 1) % max(len(order), 1)
    current, replies, updates = dict(arrays), [], []
    missing: dict[str, str] = {}
    rejected: dict[str, str] = {}
    refused: dict[str, str] = {}
    exhausted = 0
    for message in order[shift:] + order[:shift]:
        message.content["arrays"] = ArrayRecord(current)
        attendance = take_attendance([message], grid.send_and_receive([message], timeout=settings.timeout_s), roster,
                                     connected=connected, phase="train", timeout_s=settings.timeout_s)
        accepted, why, spent = screen_attendance(attendance, current, server_round=server_round, settings=settings)
        missing, rejected, exhausted = missing | attendance.missing, rejected | why, exhausted + spent
        refused |= attendance.refused
        replies += attendance.replies
        if accepted:
            current = dict(accepted[0].content.array_records["arrays"].to_torch_state_dict())
            updates += accepted
    require_quorum(server_round, usable=len(updates) + exhausted, sampled=len(sent), min_sites=settings.min_sites,
                   missing=missing, rejected=rejected, refused=refused)
    return Training(replies=replies, updates=updates, missing=missing, rejected=rejected, arrays=current,
                    refused=refused)


def gather_evaluation(
    grid: Grid, strategy: Strategy, arrays: Mapping[str, Tensor], config: ConfigRecord, roster: Roster, *,
    server_round: int, settings: ServerSettings,
) -> Attendance:
    """Run the evaluation phase of ``server_round`` on the new global ``arrays`` (no quorum: it only measures)."""
    sent = list(strategy.configure_evaluate(server_round, ArrayRecord(dict(arrays)), config, grid))
    roll_call(grid, config, timeout_s=settings.timeout_s, roster=roster, nodes=[m.metadata.dst_node_id for m in sent])
    return take_attendance(sent, grid.send_and_receive(sent, timeout=settings.timeout_s), roster,
                           connected=grid.get_node_ids(), phase="evaluate", timeout_s=settings.timeout_s)
