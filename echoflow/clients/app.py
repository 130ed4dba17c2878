"""The Flower ClientApp (Message API): a site trains or evaluates the global weights on its own data.

Deployment: ``flower-supernode ... --node-config 'site-dir="/data/echo" state-dir="/var/echoflow"'`` runs
`app` unchanged; the run config comes from the app's ``pyproject.toml`` / ``flwr run --run-config``.
Every message from our ServerApp also carries the server's run config for the stage it federates
(`run_config_record`), which wins: one run — one simulation, one Ray start — can federate several stages in turn.
The site's own setup and privacy policy are not part of it: the task it runs, its data folder, its training config
and its DP are its node config (`echoflow.clients.policy`), and a message naming another task, data or config, or
asking for weaker DP, is refused (the error reply names the reason; the server's round records it as ``refused``).

The site's privacy ledger lives in the node's ``context.state`` (which Flower keeps between rounds) and, when
a ``state-dir`` is known, in ``<state-dir>/site_XX/privacy_ledger.json`` too — the file wins, because it
survives a crash of the whole federation and a site must never forget what it has already spent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from echoflow.clients.dp import PrivacyLedger
from echoflow.clients.faults import inject_faults
from echoflow.clients.moments import latent_moments
from echoflow.clients.secagg import secagg_mod
from echoflow.clients.settings import ClientSettings
from echoflow.clients.site import evaluate, train_round
from echoflow.federation.priors import remember
from echoflow.federation.protocol import (
    LATENT_STATS,
    PRIOR_DIGESTS,
    PROXIMAL_MU,
    ROLL_CALL,
    SERVER_ROUND,
    message_run_config,
)

LEDGER_KEY = "privacy-ledger"
LEDGER_FILE = "privacy_ledger.json"


def make_client_app(defaults: Mapping[str, Any] | None = None, *, faults: bool = False,
                    site_config: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is ``defaults`` overridden by ``context.run_config``.

    ``faults``: install the fault-injection mod (`echoflow.clients.faults`), for test and soak simulations that
    plan faults; the deployed ``app`` never has it. ``site_config``: node-config entries every site of a
    simulation holds as its own (its task, data root, training config, DP policy and ``state-dir``,
    `echoflow.clients.policy`);
    ``context.node_config`` overrides them. They are baked into the app the launcher builds, never read from a
    message.
    """
    base = dict(defaults or {})
    own = dict(site_config or {})

    def run_config_of(msg: Message, context: Context) -> dict[str, Any]:
        return {**base, **context.run_config, **message_run_config(msg)}

    app = ClientApp(mods=[inject_faults(run_config_of)] if faults else [])

    def settings_of(msg: Message, context: Context) -> ClientSettings:
        torch.set_num_threads(1)  # one core per simulated site; sites run side by side
        settings = ClientSettings.from_context(run_config_of(msg, context), {**own, **context.node_config})
        priors = remember(msg)  # earlier stages' weights travel in the message: no folder shared with the server
        return replace(settings, config={**settings.config, PRIOR_DIGESTS: priors}) if priors else settings

    @app.train(mods=[secagg_mod])  # inert unless the server runs the round under SecAgg+
    def train(msg: Message, context: Context) -> Message:
        settings = settings_of(msg, context)
        arrays = msg.content.array_records["arrays"].to_torch_state_dict()
        config = msg.content.config_records["config"]
        result, ledger = train_round(
            settings, arrays, server_round=int(str(config[SERVER_ROUND])), ledger=load_ledger(settings, context),
            proximal_mu=float(str(config.get(PROXIMAL_MU, 0.0))),
        )
        if ledger is not None:
            save_ledger(settings, context, ledger)
        metrics = MetricRecord({**result.metrics, "site": settings.site})
        content = RecordDict({"metrics": metrics})
        if result.arrays is not None:
            content["arrays"] = ArrayRecord(result.arrays)
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate_global(msg: Message, context: Context) -> Message:
        settings = settings_of(msg, context)
        metrics = evaluate(settings, msg.content.array_records["arrays"].to_torch_state_dict())
        return Message(content=RecordDict({"metrics": MetricRecord({**metrics, "site": settings.site})}), reply_to=msg)

    @app.query(LATENT_STATS)
    def latent_stats(msg: Message, context: Context) -> Message:
        settings = settings_of(msg, context)
        moments, ledger = latent_moments(settings, msg.content.array_records["arrays"].to_torch_state_dict(),
                                         load_ledger(settings, context))
        if ledger is not None:
            save_ledger(settings, context, ledger)
        return Message(content=RecordDict({"metrics": MetricRecord({**moments, "site": settings.site})}), reply_to=msg)

    @app.query(ROLL_CALL)
    def roll_call(msg: Message, context: Context) -> Message:
        site = settings_of(msg, context).site
        return Message(content=RecordDict({"metrics": MetricRecord({"site": site})}), reply_to=msg)

    return app


def load_ledger(settings: ClientSettings, context: Context) -> PrivacyLedger | None:
    """The site's ledger: the site-local file if there is one, else the node context, else None."""
    if settings.state_dir is not None and (settings.state_dir / LEDGER_FILE).exists():
        return PrivacyLedger.from_state(json.loads((settings.state_dir / LEDGER_FILE).read_text()))
    if LEDGER_KEY in context.state:
        return PrivacyLedger.from_state(json.loads(str(context.state.config_records[LEDGER_KEY]["json"])))
    return None


def save_ledger(settings: ClientSettings, context: Context, ledger: PrivacyLedger) -> None:
    """Store the ledger in the node context and (atomically) in the site-local file."""
    text = json.dumps(ledger.state_dict())
    context.state[LEDGER_KEY] = ConfigRecord({"json": text})
    if settings.state_dir is not None:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = settings.state_dir / (LEDGER_FILE + ".tmp")
        tmp.write_text(text)
        tmp.replace(settings.state_dir / LEDGER_FILE)


app = make_client_app()
