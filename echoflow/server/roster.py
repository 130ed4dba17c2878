"""Who is who, and who was missing: site indices behind Flower node ids, each round's absentees and why.

Node ids are Flower's (random in a simulation, so they change when the server restarts); site indices are
ours. A roll call at the start of a federation asks every connected node its site; every reply carrying a
``site`` metric keeps the roster current. A node the roster does not know is labelled ``node-<id>``.

A sampled site is missing from a round when its reply is an error (it crashed), when no reply came within
the round's timeout (it hangs, or its SuperNode went away mid-round), or when a site seen before is no
longer connected (it dropped out). A site whose error reply says it refuses the message under its own policy
(`protocol.REFUSAL`: weaker DP, another task, data or config) is recorded apart, as ``refused``. A round is
aggregated only when at least ``federation.min_sites`` sites sent a usable reply; otherwise the round fails
with an `EchoFlowError` and the last checkpoint stays put.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from echoflow.errors import EchoFlowError
from echoflow.federation.protocol import REFUSAL, ROLL_CALL
from echoflow.server.screening import site_order

log = logging.getLogger(__name__)

#: Seconds to wait for the roll call's answers (capped by the round timeout): the sites only name themselves.
ROLL_CALL_TIMEOUT_S = 120.0
#: Characters of a failed site's error kept in the round record (Flower wraps the site's traceback).
REASON_CHARS = 200
#: What Flower puts before the text of a ClientApp's exception in an error reply.
FLOWER_MESSAGE = "occurred. Message: "
#: How a SuperNode (deployment) wraps a ClientApp's exception: ``<class '…'>:<'words'>``.
FLOWER_WRAPPER = re.compile(r"^<class '[^']*'>:<'")


@dataclass
class Roster:
    """Node id -> site index, learned from the roll call and from every reply since."""

    sites: dict[int, int] = field(default_factory=dict)

    def label(self, node_id: int) -> str:
        """The site index of ``node_id`` as text, or ``node-<id>`` when unknown."""
        return str(self.sites[node_id]) if node_id in self.sites else f"node-{node_id}"

    def learn(self, replies: Iterable[Message]) -> None:
        """Remember the site of every valid reply that names one (metric ``site``)."""
        for reply in replies:
            if not reply.has_error() and "metrics" in reply.content.metric_records:
                site = reply.content.metric_records["metrics"].get("site")
                if site is not None:
                    self.sites[reply.metadata.src_node_id] = int(site)  # type: ignore[arg-type]


def roll_call(grid: Grid, config: ConfigRecord, *, timeout_s: float, roster: Roster | None = None,
              nodes: Iterable[int] | None = None) -> Roster:
    """Ask ``nodes`` (default: every connected node) not yet in ``roster`` which site they are; returns the roster.

    Called with the nodes a phase is about to message, so every node that can fail in it has been named first
    (a node missing from an earlier roll call, e.g. while its actor was starting, is asked again); it costs
    nothing once every node is known.
    """
    roster = Roster() if roster is None else roster
    unknown = [node for node in (grid.get_node_ids() if nodes is None else nodes) if node not in roster.sites]
    if unknown:
        messages = [Message(content=RecordDict({"config": config}), dst_node_id=node,
                            message_type=f"query.{ROLL_CALL}") for node in unknown]
        replies = list(grid.send_and_receive(messages, timeout=min(timeout_s, ROLL_CALL_TIMEOUT_S)))
        for reply in replies:
            if reply.has_error():
                log.warning("roll call: node %d failed: %s", reply.metadata.src_node_id, reply.error.reason)
        roster.learn(replies)
    return roster


@dataclass(frozen=True)
class Attendance:
    """The replies of one phase of a round.

    Attributes:
        replies: the valid replies. labels: their sites' labels (same order). missing: label -> why absent.
        refused: label -> why the site refused the message (its own policy, `protocol.REFUSAL`).
    """

    replies: list[Message]
    labels: list[str]
    missing: dict[str, str]
    refused: dict[str, str] = field(default_factory=dict)


def take_attendance(
    sent: Sequence[Message], replies: Iterable[Message], roster: Roster, *, connected: Iterable[int], phase: str,
    timeout_s: float,
) -> Attendance:
    """Match ``replies`` to the ``sent`` messages of ``phase`` (``train``/``evaluate``); name the absent sites.

    A site that refused the message (its own policy) is named in ``refused``, any other absent one in ``missing``.
    """
    received = list(replies)
    roster.learn(received)
    missing: dict[str, str] = {}
    refused: dict[str, str] = {}
    for reply in received:
        if reply.has_error():
            text = _short(reply.error.reason)
            if REFUSAL.match(text):
                refused[roster.label(reply.metadata.src_node_id)] = f"{phase}: {text}"
            else:
                missing[roster.label(reply.metadata.src_node_id)] = f"{phase}: error: {text}"
    answered = {reply.metadata.src_node_id for reply in received}
    for message in sent:
        if message.metadata.dst_node_id not in answered:
            missing[roster.label(message.metadata.dst_node_id)] = f"{phase}: no reply within {timeout_s:g} s"
    online = set(connected)
    missing |= {str(site): f"{phase}: not connected" for node, site in roster.sites.items() if node not in online}
    valid = [reply for reply in received if not reply.has_error()]
    return Attendance(replies=valid, labels=[roster.label(r.metadata.src_node_id) for r in valid],
                      missing={label: missing[label] for label in sorted(missing, key=site_order)},
                      refused={label: refused[label] for label in sorted(refused, key=site_order)})


def merge_missing(*phases: Mapping[str, str]) -> dict[str, str]:
    """One reason per missing (or refusing) site over a round's phases (``"train: …; evaluate: …"``), sorted by site."""
    merged: dict[str, list[str]] = {}
    for phase in phases:
        for label, why in phase.items():
            merged.setdefault(label, []).append(why)
    return {label: "; ".join(merged[label]) for label in sorted(merged, key=site_order)}


def require_quorum(
    server_round: int, *, usable: int, sampled: int, min_sites: int, missing: Mapping[str, str],
    rejected: Mapping[str, str], refused: Mapping[str, str] | None = None,
) -> None:
    """Raise unless at least ``min_sites`` sites sent a usable training reply this round."""
    if usable >= min_sites:
        return
    absent = [f"site {label}: {why}" for label, why in {**missing, **(refused or {})}.items()]
    absent += [f"site {label}: rejected: {why}" for label, why in rejected.items()]
    raise EchoFlowError(f"round {server_round}: {usable} of {sampled} sampled sites sent a usable update, "
                        f"federation.min_sites is {min_sites} ({'; '.join(absent) or 'none sampled'})")


def wait_for_sites(grid: Grid, needed: int, *, timeout_s: float, server_round: int) -> list[int]:
    """The connected node ids once at least ``needed`` are connected; raise after ``timeout_s`` instead.

    Flower's strategies wait for ``min_available_nodes`` without a deadline; a federation whose sites dropped
    out for good would hang there instead of failing.
    """
    deadline = time.monotonic() + timeout_s
    while len(nodes := list(grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            raise EchoFlowError(f"round {server_round}: {len(nodes)} sites connected within {timeout_s:g} s, "
                                f"strategy.min_nodes needs {needed}")
        time.sleep(1.0)
    return nodes


def _short(reason: str | None) -> str:
    """The site's own words from a failed reply, unwrapped from Flower's error text.

    Simulation wraps them as ``<type>:<'… Message: words'>``, a SuperNode as ``<class '…'>:<'words'>``.
    """
    lines = [line.strip() for line in (reason or "").strip().splitlines() if line.strip()]
    text = (lines[-1] if lines else "unknown error").removesuffix("'>")
    text = FLOWER_WRAPPER.sub("", text.split(FLOWER_MESSAGE, 1)[-1])
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"
