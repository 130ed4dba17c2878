"""The federated audit: each site answers from its own index with DECISIONS, never with geometry.

Threat model: the server writes every query. A site that returned top-k similarities to arbitrary vectors was an
oracle: 128 basis-vector queries with k = N return <e_j, x_i> = x_i[j], every real embedding. So a site answers
only what the release decision needs, about generated sets it registers by content hash:

- ``query.audit``: a generated set (Q, D) in -> per query ``over`` (max similarity ≥ τ), and only where over the
  similarity and the local id of the nearest real sample. k must be 1. τ is never below the site's own τ
  (a lower requested τ is raised to it; the reply's ``meta.threshold`` says which τ was used). The site records
  each set's SHA-256 and τ in ``<folder>/answered.json``: the same set again gets the same answer for free, the
  same set at another τ is refused (no threshold search), and new sets are charged to the site's query budget
  (node config ``audit-query-budget``, rows per run; `DEFAULT_QUERY_BUDGET`) — beyond it the site refuses.
- ``query.calibrate``: the audit's percentile in -> ONE number, the site's τ: the percentile of its held-out
  samples' max similarity to its own TRAIN set (the held-out similarities themselves stay at the site).
- ``query.site``: nothing in -> the site's name.

Server side: `RemoteSite` implements `SiteSearcher` over a `Transport`, so the core `audit` runs unchanged;
`remote_calibration` collects the sites' τ into a `Calibration`. The pooled percentile (local mode's τ_global)
would need every held-out similarity, so here τ_global is the LARGEST site τ — the one τ every site answers at.

Transports: `InProcessTransport` calls each site's ClientApp directly with real Flower messages (no network,
one process); `GridTransport` talks to SuperNodes through a Flower ``Grid`` — `serve_simulation` runs it in
Flower's simulation engine, and a deployment runs the same ClientApp under ``flower-supernode``.
"""

from __future__ import annotations

import hashlib
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
#: Generated rows a site answers per run unless its node config sets ``audit-query-budget``.
DEFAULT_QUERY_BUDGET = 200_000
ANSWERED = "answered.json"


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
    folder: Path | None = None

    def save(self, folder: Path) -> None:
        """Write ``folder/index.faiss`` (+ sidecar) and ``folder/heldout.npy``; the folder name is the site name."""
        self.index.save(folder / "index.faiss")
        np.save(folder / "heldout.npy", self.heldout.astype(np.float32))

    @classmethod
    def load(cls, folder: Path) -> SiteAuditor:
        """Read what `save` wrote."""
        if not (folder / "heldout.npy").is_file():
            raise EchoFlowError(f"{folder / 'heldout.npy'}: missing; prepare the site's audit folder first")
        return cls(folder.name, load_index(folder / "index.faiss"), np.load(folder / "heldout.npy"), folder)

    def threshold(self, percentile: float) -> float:
        """The site's own τ: ``percentile`` of its held-out samples' max similarity to its TRAIN set."""
        own = self.index.search(self.heldout, k=1, threshold=None).similarity[:, 0]
        return float(np.percentile(own, percentile))

    def answer(self, action: str, content: RecordDict, *, budget: int = DEFAULT_QUERY_BUDGET,
               percentile: float = 95.0) -> RecordDict:
        """Answer one query action (see the module docstring); raises on malformed or refused requests.

        Args:
            action: ``audit``, ``calibrate`` or ``site``.
            content: the message's records.
            budget: generated rows this site answers per run.
            percentile: the site's τ percentile.
        """
        if action == "audit":
            return self._decide(content, budget=budget, percentile=percentile)
        if action == "calibrate":
            config = content.config_records.get("config", ConfigRecord())
            asked = float(str(config.get("percentile", percentile)))
            if asked != percentile:
                raise EchoFlowError(f"site {self.name}: refuses calibration at the {asked:g}th percentile; its "
                                    f"τ is the {percentile:g}th")
            return RecordDict({"meta": ConfigRecord({"threshold": self.threshold(percentile)})})
        if action == "site":
            return RecordDict({"meta": ConfigRecord({"site": self.name})})
        raise EchoFlowError(f"audit query: unknown action {action!r}; expected one of {ACTIONS}")

    def _decide(self, content: RecordDict, *, budget: int, percentile: float) -> RecordDict:
        queries = np.ascontiguousarray(content.array_records["queries"]["embeddings"].numpy(), dtype=np.float32)
        config = content.config_records["config"]
        k = int(str(config["k"]))
        if k != 1:
            raise EchoFlowError(f"site {self.name}: refuses k={k}; the audit answers the nearest sample only (k=1)")
        if queries.ndim != 2 or not np.isfinite(queries).all():
            raise EchoFlowError(f"site {self.name}: refuses queries of shape {queries.shape} or non-finite values")
        own = self.threshold(percentile)
        requested = config.get("threshold")
        tau = own if requested is None else max(float(str(requested)), own)
        digest = hashlib.sha256(repr(queries.shape).encode() + queries.tobytes()).hexdigest()
        state = self._answered()
        if digest in state["sets"] and state["sets"][digest] != tau:
            raise EchoFlowError(f"site {self.name}: refuses: generated set {digest[:12]} was already answered at "
                                f"τ={state['sets'][digest]:.6g}")
        if digest not in state["sets"]:
            if state["rows"] + len(queries) > budget:
                raise EchoFlowError(f"site {self.name}: refuses {len(queries)} more queries: its audit budget is "
                                    f"{budget} rows, {state['rows']} used")
            state["sets"][digest], state["rows"] = tau, state["rows"] + len(queries)
            self._save_answered(state)
        found = self.index.search(queries, k=1, threshold=tau)
        similarity = found.similarity[:, 0]
        over = np.asarray(similarity >= tau, dtype=bool)
        return RecordDict({
            "answer": ArrayRecord({"over": Array(over),
                                   "similarity": Array(np.where(over, similarity, -np.inf).astype(np.float32)),
                                   "ids": Array(np.where(over, found.ids[:, 0], -1).astype(np.int64))}),
            "meta": ConfigRecord({"threshold": tau, "set": digest, "scanned": float(found.scanned)}),
        })

    def _answered(self) -> dict[str, Any]:
        path = None if self.folder is None else self.folder / ANSWERED
        if path is None or not path.exists():
            return {"sets": {}, "rows": 0}
        return cast(dict[str, Any], json.loads(path.read_text()))

    def _save_answered(self, state: dict[str, Any]) -> None:
        if self.folder is not None:
            tmp = self.folder / (ANSWERED + ".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(self.folder / ANSWERED)


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


def make_audit_client_app(defaults: Mapping[str, Any] | None = None, *,
                          site_config: Mapping[str, Any] | None = None) -> ClientApp:
    """The site's ClientApp for the audit.

    ``defaults`` fill the run config the simulation engine does not pass; ``site_config`` is what every simulated
    site holds as its own node config (``audit-query-budget``, ``audit-percentile``), never read from a message.
    """
    app = ClientApp()
    base, own = dict(defaults or {}), dict(site_config or {})

    def handler(action: str) -> Callable[[Message, Context], Message]:
        def handle(msg: Message, context: Context) -> Message:
            node = {**own, **context.node_config}
            folder = site_folder(node, {**base, **context.run_config})
            answer = _open(str(folder)).answer(
                action, msg.content, budget=int(node.get("audit-query-budget", DEFAULT_QUERY_BUDGET)),
                percentile=float(node.get("audit-percentile", 95.0)))
            return Message(answer, reply_to=msg)

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
    def of_folders(cls, folders: Mapping[str, Path], *, query_budget: int = DEFAULT_QUERY_BUDGET,
                   percentile: float = 95.0) -> InProcessTransport:
        """One ClientApp per site audit folder (node config ``audit-site-dir``, the site's budget and percentile)."""
        app = make_audit_client_app()
        node = {"audit-query-budget": query_budget, "audit-percentile": percentile}
        return cls({name: (app, Context(run_id=0, node_id=i + 1, node_config={"audit-site-dir": str(folder)} | node,
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
    """A `SiteSearcher` whose index lives at the site: the generated queries go out, decisions come back.

    The `Neighbours` it returns hold the similarity and id only where the site says ``over`` (-inf / -1
    elsewhere, marked inexact: a lower bound). A site that answered at another τ than asked fails the search.
    """

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
        got = _only(reply, {"over", "similarity", "ids"}, f"site {self.name}")
        used = float(str(reply["meta"]["threshold"]))
        if threshold is not None and used != float(threshold):
            raise EchoFlowError(f"site {self.name}: answered at τ={used:.6g}, not the τ={threshold:.6g} asked")
        over = got["over"].astype(bool)
        return Neighbours(similarity=got["similarity"].astype(np.float32)[:, None],
                          ids=got["ids"].astype(np.int64)[:, None], exact=over,
                          scanned=float(str(reply["meta"]["scanned"])))


def remote_calibration(sites: Sequence[RemoteSite], *, percentile: float) -> Calibration:
    """Each site's own τ (one number per site); τ_global is the largest of them (see the module docstring)."""
    taus: dict[str, float] = {}
    for site in sites:
        reply = site.transport.send(site.name, "calibrate",
                                    RecordDict({"config": ConfigRecord({"percentile": float(percentile)})}),
                                    timeout_s=site.timeout_s)
        _only(reply, set(), f"site {site.name}")
        taus[site.name] = float(str(reply["meta"]["threshold"]))
    return Calibration(percentile=percentile, site_threshold=taus, global_threshold=max(taus.values()),
                       heldout_to_train={n: np.zeros(0, np.float32) for n in taus},
                       heldout_to_all=np.zeros(0, np.float32))


def serve_simulation(folders: Mapping[str, Path], job: Callable[[Transport], T], *, client_cpus: float = 1.0,
                     num_cpus: int = 2, timeout_s: float = 600.0, site_config: Mapping[str, Any] | None = None) -> T:
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
        run_simulation(server_app=server, client_app=make_audit_client_app(run_config, site_config=site_config),
                       num_supernodes=len(folders), backend_config=backend)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    if "value" not in outcome:
        raise EchoFlowError("federated audit: the Flower simulation ended without a result (see its log)")
    return cast(T, outcome["value"])
