"""The federated audit: each site answers from its own index; only (similarity, local sample id) pairs leave it.

Site side: a `SiteAuditor` (the site's index of its real TRAIN embeddings and its held-out embeddings, kept in a
site-local folder) answers three Flower query actions of `make_audit_client_app`:

- ``query.audit``: generated embeddings (Q, D) in -> per query the top-k similarities, local ids, exactness.
- ``query.calibrate``: nothing in -> (H,) each held-out sample's max similarity to the site's own TRAIN set.
- ``query.site``: nothing in -> the site's name.

Server side: `RemoteSite` implements `SiteSearcher` over a `Transport`, so the core `audit` runs unchanged;
`remote_calibration` turns the sites' held-out similarities into a `Calibration`. Held-out embeddings never
leave a site either, so τ_global here is the percentile of held-out→own-site-train maxima (the local mode also
compares against other sites' training sets, which can only raise a held-out sample's maximum).

Transports: `InProcessTransport` calls each site's ClientApp directly with real Flower messages (no network,
one process); `GridTransport` talks to SuperNodes through a Flower ``Grid`` — `serve_simulation` runs it in
Flower's simulation engine, and a deployment runs the same ClientApp under ``flower-supernode``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp

from echoflow.audit.calibrate import Calibration
from echoflow.audit.index import load_index
from echoflow.audit.neighbours import Neighbours, SiteIndex
from echoflow.errors import EchoFlowError

ACTIONS = ("audit", "calibrate", "site")
T = TypeVar("T")


@dataclass(frozen=True)
class SiteAuditor:
    """What one site holds for the audit; nothing here is ever sent as such.

    Attributes:
        name: the site's name.
        index: its real TRAIN embeddings' index.
        heldout: (H, D) raw re-id embeddings of its held-out (VAL + TEST) real frames, for calibration.
    """

    name: str
    index: SiteIndex
    heldout: np.ndarray

    def save(self, folder: Path) -> None:
        """Write ``folder/index.faiss`` (+ sidecar) and ``folder/heldout.npy``; the folder name is the site name."""
        self.index.save(folder / "index.faiss")
        np.save(folder / "heldout.npy", self.heldout.astype(np.float32))

    @classmethod
    def load(cls, folder: Path) -> SiteAuditor:
        """Read what `save` wrote."""
        if not (folder / "heldout.npy").is_file():
            raise EchoFlowError(f"{folder / 'heldout.npy'}: missing; prepare the site's audit folder first")
        return cls(folder.name, load_index(folder / "index.faiss"), np.load(folder / "heldout.npy"))

    def answer(self, action: str, content: RecordDict) -> RecordDict:
        """Answer one query action (see the module docstring); raises on malformed requests."""
        if action == "audit":
            queries = content.array_records["queries"]["embeddings"].numpy()
            config = content.config_records["config"]
            threshold = config.get("threshold")
            found = self.index.search(queries, k=int(str(config["k"])),
                                      threshold=None if threshold is None else float(str(threshold)))
            return RecordDict({
                "answer": ArrayRecord({"similarity": Array(found.similarity), "ids": Array(found.ids),
                                       "exact": Array(found.exact)}),
                "meta": ConfigRecord({"scanned": float(found.scanned)}),
            })
        if action == "calibrate":
            own = self.index.search(self.heldout, k=1, threshold=None).similarity[:, 0]
            return RecordDict({"answer": ArrayRecord({"similarity": Array(own.astype(np.float32))})})
        if action == "site":
            return RecordDict({"meta": ConfigRecord({"site": self.name})})
        raise EchoFlowError(f"audit query: unknown action {action!r}; expected one of {ACTIONS}")


@lru_cache(maxsize=16)
def _open(folder: str) -> SiteAuditor:
    return SiteAuditor.load(Path(folder))


def site_folder(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Path:
    """The site's audit folder.

    Node config ``audit-site-dir`` (deployment), else entry ``partition-id`` of the run config's
    ``audit-site-dirs`` JSON list (simulation).
    """
    if "audit-site-dir" in node_config:
        return Path(str(node_config["audit-site-dir"]))
    try:
        folders = json.loads(str(run_config["audit-site-dirs"]))
        return Path(folders[int(str(node_config["partition-id"]))])
    except (KeyError, IndexError) as err:
        raise EchoFlowError(f"node_config/run_config: no audit folder for this site ({err})") from err


def make_audit_client_app(defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """The site's ClientApp for the audit; ``defaults`` fill the run config the simulation engine does not pass."""
    app = ClientApp()
    base = dict(defaults or {})

    def handler(action: str) -> Callable[[Message, Context], Message]:
        def handle(msg: Message, context: Context) -> Message:
            folder = site_folder(context.node_config, {**base, **context.run_config})
            return Message(_open(str(folder)).answer(action, msg.content), reply_to=msg)

        return handle

    for action in ACTIONS:
        app.query(action)(handler(action))
    return app


class Transport(Protocol):
    """Carries one query to one site and its answer back."""

    def send(self, site: str, action: str, content: RecordDict, *, timeout_s: float | None) -> RecordDict:
        """Send ``content`` as ``query.<action>`` to ``site``; return the reply's content or raise."""
        ...


@dataclass
class InProcessTransport:
    """Calls each site's ClientApp in this process with real Flower messages (tests, single-machine runs).

    Attributes:
        apps: site name -> (its ClientApp, its node Context).
    """

    apps: Mapping[str, tuple[ClientApp, Context]]

    def send(self, site: str, action: str, content: RecordDict, *, timeout_s: float | None) -> RecordDict:  # noqa: D102
        app, context = self.apps[site]
        metadata = Metadata(run_id=context.run_id, message_id=f"{site}-{time.monotonic_ns()}", src_node_id=0,
                            dst_node_id=context.node_id, reply_to_message_id="", group_id="audit",
                            created_at=time.time(), ttl=timeout_s or 3600.0, message_type=f"query.{action}")
        # a routed message, as a SuperNode hands it to a ClientApp (Flower's metadata-only constructor)
        reply = app(Message(content=content, metadata=metadata), context)  # type: ignore[call-overload]
        if reply.has_error():
            raise EchoFlowError(f"site {site}: {reply.error.reason}")
        return reply.content

    @classmethod
    def of_folders(cls, folders: Mapping[str, Path]) -> InProcessTransport:
        """One ClientApp per site audit folder (node config ``audit-site-dir``)."""
        app = make_audit_client_app()
        return cls({name: (app, Context(run_id=0, node_id=i + 1, node_config={"audit-site-dir": str(folder)},
                                        state=RecordDict(), run_config={}))
                    for i, (name, folder) in enumerate(folders.items())})


class GridTransport:
    """Talks to SuperNodes through a Flower ``Grid`` (one message in flight at a time; grids are not thread-safe)."""

    def __init__(self, grid: Any, nodes: Mapping[str, int]) -> None:
        """``nodes``: site name -> node id (see `connect`)."""
        self.grid, self.nodes, self._lock = grid, dict(nodes), threading.Lock()

    @classmethod
    def connect(cls, grid: Any, *, sites: int, timeout_s: float) -> GridTransport:
        """Wait for ``sites`` nodes, ask each its site name, and map names to node ids."""
        deadline = time.monotonic() + timeout_s
        while len(nodes := list(grid.get_node_ids())) < sites:
            if time.monotonic() > deadline:
                raise EchoFlowError(f"federated audit: {len(nodes)} of {sites} sites connected within {timeout_s} s")
            time.sleep(0.2)
        transport = cls(grid, {})
        for node in nodes:
            name = str(transport._exchange(node, "site", RecordDict(), timeout_s=timeout_s)["meta"]["site"])
            transport.nodes[name] = node
        return transport

    def _exchange(self, node: int, action: str, content: RecordDict, *, timeout_s: float | None) -> RecordDict:
        with self._lock:
            replies = list(self.grid.send_and_receive(
                [Message(content=content, dst_node_id=node, message_type=f"query.{action}")], timeout=timeout_s))
        if not replies:
            raise EchoFlowError(f"node {node}: no answer within {timeout_s} s")
        if replies[0].has_error():
            raise EchoFlowError(f"node {node}: {replies[0].error.reason}")
        return replies[0].content

    def send(self, site: str, action: str, content: RecordDict, *, timeout_s: float | None) -> RecordDict:  # noqa: D102
        if site not in self.nodes:
            raise EchoFlowError(f"site {site}: not connected (connected: {sorted(self.nodes)})")
        return self._exchange(self.nodes[site], action, content, timeout_s=timeout_s)


def _only(record: RecordDict, arrays: set[str], what: str) -> dict[str, np.ndarray]:
    """The reply's ``answer`` arrays, refusing anything else a site might send."""
    names = set(record.array_records.get("answer", ArrayRecord()).keys())
    if set(record.keys()) - {"answer", "meta"} or names != arrays:
        raise EchoFlowError(f"{what}: unexpected reply records {sorted(record.keys())} / arrays {sorted(names)}")
    return {name: record.array_records["answer"][name].numpy() for name in arrays}


@dataclass(frozen=True)
class RemoteSite:
    """A `SiteSearcher` whose index lives at the site: only the generated queries go out."""

    name: str
    transport: Transport
    timeout_s: float | None = None

    def search(self, queries: np.ndarray, *, k: int, threshold: float | None) -> Neighbours:  # noqa: D102
        config = ConfigRecord({"k": int(k)})
        if threshold is not None:
            config["threshold"] = float(threshold)
        content = RecordDict({"queries": ArrayRecord({"embeddings": Array(np.ascontiguousarray(queries, np.float32))}),
                              "config": config})
        reply = self.transport.send(self.name, "audit", content, timeout_s=self.timeout_s)
        got = _only(reply, {"similarity", "ids", "exact"}, f"site {self.name}")
        return Neighbours(similarity=got["similarity"].astype(np.float32), ids=got["ids"].astype(np.int64),
                          exact=got["exact"].astype(bool), scanned=float(str(reply["meta"]["scanned"])))


def remote_calibration(sites: Sequence[RemoteSite], *, percentile: float) -> Calibration:
    """τ per site from each site's own held-out→train maxima; τ_global over all of them (see module docstring)."""
    own: dict[str, np.ndarray] = {}
    for site in sites:
        reply = site.transport.send(site.name, "calibrate", RecordDict(), timeout_s=site.timeout_s)
        own[site.name] = _only(reply, {"similarity"}, f"site {site.name}")["similarity"].astype(np.float32)
    every = np.concatenate(list(own.values()))
    return Calibration(percentile=percentile,
                       site_threshold={n: float(np.percentile(s, percentile)) for n, s in own.items()},
                       global_threshold=float(np.percentile(every, percentile)), heldout_to_train=own,
                       heldout_to_all=every)


def serve_simulation(folders: Mapping[str, Path], job: Callable[[Transport], T], *, client_cpus: float = 1.0,
                     num_cpus: int = 2, timeout_s: float = 600.0) -> T:
    """Run ``job`` inside a Flower ServerApp whose sites (one simulated SuperNode each) hold ``folders``.

    The sites run `make_audit_client_app` in Flower's simulation engine (Ray, as `echoflow.federation`
    launches training); ``job`` gets a `GridTransport` and its return value comes back here.
    """
    import ray
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    outcome: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["value"] = job(GridTransport.connect(grid, sites=len(folders), timeout_s=timeout_s))
        except Exception as error:  # re-raised below: the engine would only log it
            outcome["error"] = error

    run_config = {"audit-site-dirs": json.dumps([str(folder) for folder in folders.values()])}
    backend: dict[str, Any] = {"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
               "init_args": {"num_cpus": num_cpus, "include_dashboard": False, "object_store_memory": 128 * 2**20}}
    try:
        run_simulation(server_app=server, client_app=make_audit_client_app(run_config),
                       num_supernodes=len(folders), backend_config=backend)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    if "value" not in outcome:
        raise EchoFlowError("federated audit: the Flower simulation ended without a result (see its log)")
    return cast(T, outcome["value"])
