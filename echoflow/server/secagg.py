"""Secure aggregation (SecAgg+) of the sites' updates: the server learns their mean, never one site's update.

Flower 1.42 has SecAgg+ only for its older API: `flwr.client.mod.secaggplus_mod` at the sites and
`flwr.server.workflow.SecAggPlusWorkflow` at the server, which speaks ``FitIns``/``FitRes`` through a
``LegacyContext`` and a legacy strategy. This module bridges it into the Message-API round loop:

- Server (`gather_secure_training`, used by the loop instead of `echoflow.server.gather.gather_training` when
  ``secagg`` is on): the Message-API strategy still samples the sites and writes their config
  (``configure_train``); the workflow's four stages (setup, share keys, collect masked vectors, unmask) run over
  the same `Grid` as ``train`` messages; the unmasked MEAN of the updates, added to the global weights, goes to
  the strategy as one reply — so FedAvg, FedProx, FedAvgM, FedAdam and FedYogi aggregate as usual.
- Site (`echoflow.clients.secagg.secagg_mod` on the ClientApp's train function): in the collect stage the
  site's ordinary train function runs on the global weights, and its update ``trained - global`` is what
  ``secaggplus_mod`` clips, quantises and masks.

Limits. Every update is clipped to ``[-clipping_range, clipping_range]`` per coordinate and stochastically
quantised to ``quantization_range`` levels (defaults ±1 and 2²²: steps of 4.8e-7, far below a round's updates);
sites weigh equally (SecAgg+ would scale each update by ``num_examples / max_weight`` before quantising, which
costs that factor in precision), and a site whose privacy budget is spent takes part with weight 0. Median,
trimmed mean and Krum need the individual updates and are refused, as is update screening (it is skipped).
The sites' metrics (loss, ε, example counts) still travel in clear. DP-SGD runs before masking, so each
site's (ε, δ) is unchanged; SecAgg+ adds that the server sees only the sum.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from echoflow.errors import EchoFlowError
from echoflow.federation.protocol import ARRAY_KEYS
from echoflow.server.gather import Training, sample_training
from echoflow.server.roster import Roster, require_quorum
from echoflow.server.settings import ServerSettings

#: Strategies that need the individual updates, which SecAgg+ hides.
UNSUPPORTED = ("fedmedian", "fedtrimmedavg", "krum", "cyclic")

@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ settings (run-config keys ``secagg``, ``secagg-clipping-range``, …).

    Attributes:
        enabled: run the update path under SecAgg+.
        clipping_range: per-coordinate bound on an update before quantisation.
        quantization_range: quantisation levels over ``[-clipping_range, clipping_range]``.
        num_shares: sites each site secret-shares its keys with (a float: share of the sampled sites).
        threshold: shares needed to reconstruct a secret (a float: share of ``num_shares``).
    """

    enabled: bool = False
    clipping_range: float = 1.0
    quantization_range: int = 2**22
    num_shares: float = 1.0
    threshold: float = 0.67

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> SecAggConfig:
        """Read ``secagg`` and ``secagg-<field-with-dashes>`` from a flat run config."""
        values = {f.name: type(cast(Any, f.default))(run_config[key]) for f in fields(cls)
                  if (key := "secagg" if f.name == "enabled" else "secagg-" + f.name.replace("_", "-")) in run_config}
        return cls(**values)


class _SiteRound(LegacyFedAvg):
    """The legacy strategy the workflow asks: it hands out the sampled sites' FitIns and keeps what comes back."""

    def __init__(self, fitins: dict[int, FitIns], grid: Grid) -> None:
        super().__init__()
        self.fitins, self.grid = fitins, grid
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.mean_update: list[np.ndarray] | None = None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """The FitIns of the sites the Message-API strategy sampled."""
        run_id = self.grid.run.run_id
        return [(GridClientProxy(node, self.grid, run_id), ins) for node, ins in self.fitins.items()]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Keep the replies (their parameters are already the unmasked mean update) and that mean."""
        self.results = results
        if results:
            self.mean_update = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}


class _Workflow(SecAggPlusWorkflow):
    """`SecAggPlusWorkflow` that skips unmasking when every site has weight 0 (all budgets spent)."""

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Unmask the sum, unless there is no weight to divide it by."""
        if not any(fitres.num_examples for _, fitres in state.legacy_results):
            context.strategy.results = state.legacy_results  # type: ignore[attr-defined]
            return True
        return cast(bool, super().unmask_stage(grid, context, state))


def gather_secure_training(
    grid: Grid, strategy: Strategy, arrays: Mapping[str, Tensor], config: ConfigRecord, roster: Roster, *,
    server_round: int, settings: ServerSettings,
) -> Training:
    """The training phase of ``server_round`` under SecAgg+: per-site metrics, and ONE update — the mean.

    Raises:
        EchoFlowError: for a strategy that needs individual updates, or when too few sites finish the protocol.
    """
    secagg = SecAggConfig.from_run_config(settings.run_config)
    if settings.strategy.name in UNSUPPORTED:
        raise EchoFlowError(f"secagg: strategy {settings.strategy.name!r} needs the individual updates; "
                            f"use one of fedavg, fedprox, fedavgm, fedadam, fedyogi")
    _, sent = sample_training(grid, strategy, arrays, config, roster, server_round=server_round, settings=settings)
    keys = list(arrays)
    parameters = ndarrays_to_parameters([arrays[k].numpy() for k in keys])
    site_round = _SiteRound({
        m.metadata.dst_node_id: FitIns(parameters, {**cast(dict[str, Scalar], dict(m.content["config"])),
                                                    ARRAY_KEYS: json.dumps(keys)})
        for m in sent}, grid)
    _run_workflow(grid, site_round, secagg, server_round=server_round, timeout_s=settings.timeout_s)
    answered = {cast(GridClientProxy, proxy).node_id for proxy, _ in site_round.results}
    missing = {roster.label(m.metadata.dst_node_id): "train: dropped out of secure aggregation"
               for m in sent if m.metadata.dst_node_id not in answered}
    require_quorum(server_round, usable=len(answered), sampled=len(sent), min_sites=settings.min_sites,
                   missing=missing, rejected={})
    replies = [Message(RecordDict({"metrics": MetricRecord(cast(dict[str, Any], fitres.metrics))}),
                       dst_node_id=cast(GridClientProxy, proxy).node_id, message_type="train")
               for proxy, fitres in site_round.results]
    updates = []
    if site_round.mean_update is not None:
        mean = {k: (v.double() + torch.from_numpy(d)).to(v.dtype)
                for (k, v), d in zip(arrays.items(), site_round.mean_update, strict=True)}
        contributors = sum(fitres.num_examples for _, fitres in site_round.results)
        updates.append(Message(RecordDict({"arrays": ArrayRecord(mean),
                                           "metrics": MetricRecord({"num-examples": float(contributors)})}),
                               dst_node_id=0, message_type="train"))
    return Training(replies=replies, updates=updates, missing=missing, rejected={})


def _run_workflow(grid: Grid, site_round: _SiteRound, secagg: SecAggConfig, *, server_round: int,
                  timeout_s: float) -> None:
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})
    context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=site_round)
    workflow = _Workflow(num_shares=secagg.num_shares, reconstruction_threshold=secagg.threshold, max_weight=1.0,
                         clipping_range=secagg.clipping_range, quantization_range=secagg.quantization_range,
                         timeout=timeout_s)
    workflow(grid, context)
