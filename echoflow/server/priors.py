"""The server's half of `echoflow.federation.priors`: earlier stages' final global weights attached to messages.

`prior_weights` reads them from the server's own checkpoint folders (``config["stage_checkpoints"]``: the server
wrote them); `PriorGrid` wraps the Grid so that every message of the stage — train, evaluate, roll call, the
SecAgg+ stages — carries them, whichever code path builds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from torch import Tensor

from echoflow.checkpoints import latest_round, load_checkpoint
from echoflow.errors import EchoFlowError
from echoflow.federation.priors import prior_records
from echoflow.federation.task import SiteTask


def prior_weights(task: SiteTask, stage: str, config: Mapping[str, Any]) -> dict[str, dict[str, Tensor]]:
    """Per earlier stage the task says ``stage`` needs (``task.prior_stages``), its latest global ``model`` arrays.

    Raises:
        EchoFlowError: a needed stage has no checkpoint folder in ``config["stage_checkpoints"]`` or no round.
    """
    needs = getattr(task, "prior_stages", lambda _name: ())(stage)
    folders = dict(config.get("stage_checkpoints") or {})
    priors = {}
    for earlier in needs:
        latest = latest_round(Path(folders[earlier])) if earlier in folders else None
        if latest is None:
            raise EchoFlowError(f"stage {stage}: needs the federated {earlier!r} first (no round in "
                                f"{folders.get(earlier)!r})")
        tensors, _ = load_checkpoint(latest)
        priors[earlier] = {k[len("global/"):]: v for k, v in tensors.items() if k.startswith("global/model.")}
    return priors


class PriorGrid(Grid):
    """A Grid that adds ``records`` (``prior-<stage>`` ArrayRecords) to every message it sends."""

    def __init__(self, grid: Grid, records: Mapping[str, ArrayRecord]) -> None:
        self.grid, self.records = grid, dict(records)

    def _with_priors(self, messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        for message in out:
            for name, record in self.records.items():
                message.content[name] = record
        return out

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.grid.push_messages(self._with_priors(messages))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:  # noqa: D102
        return self.grid.send_and_receive(self._with_priors(messages), timeout=timeout)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.grid.pull_messages(message_ids)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,  # noqa: D102
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:  # noqa: D102
        return self.grid.get_nodes()

    def set_run(self, run: Run) -> None:  # noqa: D102
        self.grid.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102
        return self.grid.run


def with_priors(grid: Grid, task: SiteTask, stage: str, config: Mapping[str, Any]) -> Grid:
    """``grid`` itself when ``stage`` needs no earlier weights, else a `PriorGrid` carrying them."""
    priors = prior_weights(task, stage, config)
    return PriorGrid(grid, prior_records(priors)) if priors else grid
