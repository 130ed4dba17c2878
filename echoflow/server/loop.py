"""The resumable round loop: Flower strategies do the sampling and aggregation, this loop owns the rounds.

Flower's ``Strategy.start`` always begins at round 1; ours begins after the latest checkpoint. Each round:
train on the sampled sites, drop the replies of sites whose privacy budget is spent (they say so and send no
weights), leave out sites that fail and updates that fail screening (`echoflow.server.gather`), aggregate the
rest in site order, evaluate, checkpoint, log. A round in which no site could train (every privacy budget
spent) stops the run with a one-line error: the stage — and the pipeline after it — never goes on with
untrained weights. After the last round of a stage whose weights carry a VAE ``latent_scale``, the sites pool
their latent statistics into that global scale, written into the final checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from echoflow.errors import EchoFlowError
from echoflow.federation.protocol import run_config_record
from echoflow.federation.task import group_arrays, load_task
from echoflow.server.checkpoint import FederationState, load_latest, save_round
from echoflow.server.gather import Training, gather_cyclic_training, gather_evaluation, gather_training
from echoflow.server.latent_scale import federated_latent_scale
from echoflow.server.priors import with_priors
from echoflow.server.roster import Roster, merge_missing
from echoflow.server.secagg import SecAggConfig, gather_secure_training
from echoflow.server.settings import ServerSettings
from echoflow.server.strategies import CyclicWeightTransfer, load_strategy_state, make_strategy, strategy_state
from echoflow.server.tracking import RunTracker, round_metrics

log = logging.getLogger(__name__)

#: The VAE's latent scale buffer in the exchanged arrays (group ``model``).
LATENT_SCALE_KEY = "model.latent_scale"

#: Run-config keys that identify a federation; a checkpoint resumes only under the same values.
IDENTITY_KEYS = ("task", "stage", "seed", "local-steps", "batch-size", "lr", "dp-enabled", "dp-epsilon", "dp-delta",
                 "dp-max-grad-norm", "strategy")


def run_federation(grid: Grid, settings: ServerSettings, run_config: Mapping[str, Any]) -> FederationState:
    """Run (or resume) the federation to ``settings.rounds``; returns the final state (also on disk)."""
    strategy = make_strategy(settings.strategy)
    state = load_latest(settings.checkpoint_dir) if settings.resume else None
    if state is None:
        torch.manual_seed(settings.seed)
        stage = load_task(settings.task).build_stage(settings.stage, settings.config)
        state = FederationState(round=0, arrays=group_arrays(stage), run_config=dict(run_config))
    else:
        check_same_federation(state.run_config, run_config, where=str(settings.checkpoint_dir))
        log.info("resuming %s after round %d", settings.checkpoint_dir, state.round)
        load_strategy_state(strategy, state.strategy)
    tracker = _tracker(settings, state)
    grid = with_priors(grid, load_task(settings.task), settings.stage, settings.config)  # e.g. the VAE, to sites
    roster = Roster()
    try:
        for server_round in range(state.round + 1, settings.rounds + 1):
            state = run_round(grid, strategy, state, server_round=server_round, settings=settings, roster=roster)
            if not entry_trained(state.history[-1]):
                raise EchoFlowError(stage_stopped(settings.stage, state.history[-1]))
            save_round(settings.checkpoint_dir, state)
            if tracker is not None:
                entry = state.history[-1]
                tracker.log_round(server_round, round_metrics(entry["sites"], entry["aggregate"],
                                                              wall_s=entry["wall_s"]))
                tracker.log_curves(entry["sites"])
                tracker.log_faults(server_round, missing=entry["missing"], rejected=entry["rejected"],
                                   refused=entry["refused"])
        if LATENT_SCALE_KEY in state.arrays and state.round > 0:  # the VAE: sites agree on one latent scale
            scale = federated_latent_scale(grid, state.arrays, run_config_record(settings.run_config),
                                            timeout_s=settings.timeout_s)
            state.arrays = {**state.arrays, LATENT_SCALE_KEY: torch.tensor(scale, dtype=torch.float32)}
            save_round(settings.checkpoint_dir, state)
        if tracker is not None:
            tracker.log_artifact(settings.checkpoint_dir / f"round_{state.round:04d}", artifact_path="global")
            tracker.finish()
    except BaseException:
        if tracker is not None:
            tracker.finish(failed=True)
        raise
    return state


def run_round(
    grid: Grid, strategy: Strategy, state: FederationState, *, server_round: int, settings: ServerSettings,
    roster: Roster | None = None,
) -> FederationState:
    """One round of training (+ evaluation); returns the next state (not yet saved).

    Sites that crash, hang or drop out are left out and named in the round's ``missing``; sites that refuse the
    message under their own policy in its ``refused``; updates that fail screening in its ``rejected``
    (`echoflow.server.gather`). ``roster`` maps node ids to sites.
    """
    started = time.perf_counter()
    config = run_config_record(settings.run_config)
    roster = Roster() if roster is None else roster
    train = _gather(strategy, settings)(grid, strategy, state.arrays, config, roster, server_round=server_round,
                                        settings=settings)
    per_site = _site_metrics(train.replies)
    new_arrays = state.arrays if train.arrays is None else train.arrays
    if train.updates and train.arrays is None:
        aggregated, _ = strategy.aggregate_train(server_round, train.updates)
        if aggregated is not None:
            new_arrays = dict(aggregated.to_torch_state_dict())
    missing, refused = [train.missing], [train.refused]
    if settings.evaluate:
        evaluated = gather_evaluation(grid, strategy, new_arrays, config, roster, server_round=server_round,
                                      settings=settings)
        missing.append(evaluated.missing)
        refused.append(evaluated.refused)
        for site, values in _site_metrics(evaluated.replies).items():
            if "eval-loss" in values:  # a site without validation data is not evaluated
                per_site.setdefault(site, {})["eval-loss"] = values["eval-loss"]
    sites = dict(state.sites) | {str(s): dict(v) for s, v in per_site.items()}
    faults = {"sites-missing": float(len(train.missing)), "sites-rejected": float(len(train.rejected)),
              "sites-refused": float(len(train.refused))}
    entry = {"round": server_round, "wall_s": time.perf_counter() - started, "sites": per_site,
             "aggregate": _aggregate(per_site) | faults, "trained": len(train.updates),
             "missing": merge_missing(*missing), "rejected": train.rejected, "refused": merge_missing(*refused)}
    return FederationState(round=server_round, arrays=new_arrays, strategy=strategy_state(strategy), sites=sites,
                           history=[*state.history, entry], run_config=state.run_config,
                           mlflow_run_id=state.mlflow_run_id)


def _gather(strategy: Strategy, settings: ServerSettings) -> Callable[..., Training]:
    """The training phase: under SecAgg+ (it refuses strategies it cannot serve), a cycle through sites, or plain."""
    if SecAggConfig.from_run_config(settings.run_config).enabled:
        return gather_secure_training
    return gather_cyclic_training if isinstance(strategy, CyclicWeightTransfer) else gather_training


def check_same_federation(saved: Mapping[str, Any], current: Mapping[str, Any], *, where: str) -> None:
    """Refuse to resume a checkpoint written by a different federation (stage, DP, strategy, optimisation)."""
    for key in IDENTITY_KEYS:
        if str(saved.get(key)) != str(current.get(key)):
            raise EchoFlowError(f"{where}: holds a different federation ({key} {saved.get(key)!r}, now "
                                f"{current.get(key)!r}); use another federation.checkpoint_dir or resume=false")


def stage_stopped(stage: str, entry: Mapping[str, Any]) -> str:
    """The one-line error of a round no site could train in: the stage would keep untrained weights."""
    spent = sorted(str(site) for site, values in entry["sites"].items() if values.get("budget-exhausted", 0.0))
    why = [f"site {site}: privacy budget spent" for site in spent]
    faults = {**entry["missing"], **entry.get("refused", {}), **entry["rejected"]}
    why += [f"site {site}: {reason}" for site, reason in faults.items()]
    return (f"stage {stage}: round {entry['round']}: no site could train ({'; '.join(why) or 'none sampled'}); "
            "stopping the run rather than going on with untrained weights")


def entry_trained(entry: Mapping[str, Any]) -> bool:
    """Whether any site trained in the round of this history entry."""
    return int(entry["trained"]) > 0


def _ok(replies: Iterable[Message]) -> list[Message]:
    good = []
    for message in replies:
        if message.has_error():
            log.warning("site node %d failed: %s", message.metadata.src_node_id, message.error.reason)
        else:
            good.append(message)
    return good


def _site_metrics(replies: Iterable[Message]) -> dict[int, dict[str, Any]]:
    """Per site, its reply's metrics: numbers as float, lists (a round's training curve) as lists of float."""
    result = {}
    for message in _ok(replies):
        metrics = {k: [float(x) for x in v] if isinstance(v, list) else float(v)  # type: ignore[arg-type]
                   for k, v in message.content["metrics"].items()}
        result[int(cast(float, metrics["site"]))] = metrics
    return result


def _aggregate(per_site: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Example-weighted train/eval loss over the sites that report them; the largest ε any site has spent."""
    result: dict[str, float] = {}
    for key in ("train-loss", "eval-loss"):
        pairs = [(v[key], v.get("num-examples", 1.0)) for v in per_site.values()
                 if key in v and not v.get("budget-exhausted", 0.0)]
        weight = sum(w for _, w in pairs)
        if pairs and weight > 0:
            result[key] = sum(x * w for x, w in pairs) / weight
    result["epsilon-max"] = max((v.get("epsilon", 0.0) for v in per_site.values()), default=0.0)
    result["sites-trained"] = float(sum(1 for v in per_site.values()
                                        if "budget-exhausted" in v and not v["budget-exhausted"]))
    return result


def _tracker(settings: ServerSettings, state: FederationState) -> RunTracker | None:
    if not settings.mlflow_uri:
        return None
    tracker = RunTracker(tracking_uri=settings.mlflow_uri, experiment=settings.mlflow_experiment,
                         run_name=settings.run_name, parent_run_id=settings.mlflow_parent_run_id,
                         run_id=state.mlflow_run_id)
    if state.mlflow_run_id is None:
        tracker.log_params(state.run_config)
        state.mlflow_run_id = tracker.run_id
    return tracker
