"""A Flower `Grid` that hands messages to our ClientApp in this process: the round loop without Ray (seconds).

Like the simulation engine it routes each message to a node's `Context` (``partition-id`` = site), turns a
ClientApp exception into an error reply, gives up on replies after ``timeout`` and returns the replies in
an arbitrary (seeded) order. ``parallel`` runs the messages of one call in threads (a hanging site then
does not hold up the others); sequential calls are deterministic (torch's global RNG is shared by threads).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from echoflow.clients.app import make_client_app

NODE_BASE = 7_000


class LocalGrid(Grid):
    """``sites`` nodes in this process, each running `make_client_app`.

    ``node_config``: what every site holds as its own node config; ``site_configs``: per site index, entries
    that override it for that site alone.
    """

    def __init__(self, sites: int, *, order_seed: int = 0, parallel: bool = False,
                 node_config: dict[str, Any] | None = None, site_configs: dict[int, dict[str, Any]] | None = None,
                 ) -> None:
        # the process-wide identity Flower stamps on new messages (the simulation engine sets it likewise)
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self.app = make_client_app(faults=True)  # inert unless a test's run config plans faults
        self.contexts = {NODE_BASE + i: Context(run_id=1, node_id=NODE_BASE + i,
                                                node_config={"partition-id": i, "num-partitions": sites,
                                                             **(node_config or {}),
                                                             **(site_configs or {}).get(i, {})},
                                                state=RecordDict(), run_config={}) for i in range(sites)}
        self.order = random.Random(order_seed)
        self.pool = ThreadPoolExecutor(max_workers=sites if parallel else 1)

    def set_up(self, node_config: dict[str, Any]) -> LocalGrid:
        """Add ``node_config`` to every site's own node config (a launcher setting its sites up); returns self."""
        for context in self.contexts.values():
            context.node_config = {**node_config, **context.node_config}
        return self

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver ``messages``; the replies that came within ``timeout``, shuffled."""
        futures = [self.pool.submit(self._deliver, message) for message in messages]
        done, _ = wait(futures, timeout=timeout)
        replies = [future.result() for future in done]
        self.order.shuffle(replies)
        return replies

    def close(self) -> None:
        """Wait for late (hanging) sites and stop the worker threads."""
        self.pool.shutdown(wait=True)

    def _deliver(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        metadata = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=SUPERLINK_NODE_ID, dst_node_id=node,
                            reply_to_message_id="", group_id=message.metadata.group_id, created_at=time.time(),
                            ttl=3600.0, message_type=message.metadata.message_type)
        routed = Message(content=message.content, metadata=metadata)  # type: ignore[call-overload]
        try:
            return self.app(routed, self.contexts[node])
        except Exception as err:
            wrapped = ClientAppException(str(err))
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 reason=f"{type(wrapped)}:<'{wrapped}'>"), reply_to=routed)
