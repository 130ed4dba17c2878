"""MLflow logging of a federation: one run (nested under a parent when given), metrics per round and per site.

Uses an explicit `MlflowClient` (no fluent global state): the ServerApp may run in a thread (simulation) or
its own process (deployment), and a resumed federation re-opens the same run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

MAX_BATCH = 100


class RunTracker:
    """Logs one federation to MLflow.

    Args:
        tracking_uri: MLflow tracking URI. experiment: experiment name (created when missing).
        run_name: the run's name. parent_run_id: nest under this run. run_id: re-open this run (resume).
    """

    def __init__(
        self, *, tracking_uri: str, experiment: str, run_name: str, parent_run_id: str = "", run_id: str | None = None
    ) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
            run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        else:
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log ``params`` (values as strings, truncated to MLflow's limit)."""
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_BATCH])

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Log ``metrics`` (e.g. ``train_loss``, ``site_01/epsilon``) at step ``server_round``."""
        now = get_current_time_millis()
        items = [Metric(k, float(v), now, server_round) for k, v in sorted(metrics.items())]
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + MAX_BATCH])

    def log_curves(self, per_site: Mapping[int, Mapping[str, Any]]) -> None:
        """Log each site's training curve of a round as ``site_XX/train_loss_step`` at its global step numbers.

        Sites send the curve as ``train-loss-curve`` with ``train-loss-steps`` (none under DP or SecAgg+).
        """
        now = get_current_time_millis()
        items = [Metric(f"site_{site:02d}/train_loss_step", float(loss), now, int(step))
                 for site, values in sorted(per_site.items())
                 for loss, step in zip(values.get("train-loss-curve", []), values.get("train-loss-steps", []),
                                       strict=True)]
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + MAX_BATCH])

    def log_faults(self, server_round: int, *, missing: Mapping[str, str], rejected: Mapping[str, str],
                   refused: Mapping[str, str] | None = None) -> None:
        """Record who was missing from round ``server_round``, who refused it, whose update was rejected, and why.

        Written as ``faults/round_NNNN.json`` (only for rounds with faults); the counts are round metrics.
        """
        if missing or rejected or refused:
            self.client.log_dict(self.run_id, {"round": server_round, "missing": dict(missing),
                                               "refused": dict(refused or {}), "rejected": dict(rejected)},
                                 f"faults/round_{server_round:04d}.json")

    def log_artifact(self, path: Path, *, artifact_path: str | None = None) -> None:
        """Upload a file or folder."""
        self.client.log_artifacts(self.run_id, str(path), artifact_path) if path.is_dir() else (
            self.client.log_artifact(self.run_id, str(path), artifact_path))

    def finish(self, *, failed: bool = False) -> None:
        """Mark the run finished (or failed)."""
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def round_metrics(
    per_site: Mapping[int, Mapping[str, Any]], aggregated: Mapping[str, float], *, wall_s: float
) -> dict[str, float]:
    """Flatten a round's per-site and aggregated metrics into MLflow keys (``-`` becomes ``_``).

    Lists (a site's training curve) are left out: `RunTracker.log_curves` logs them step by step.
    """
    flat = {k.replace("-", "_"): float(v) for k, v in aggregated.items()} | {"round_wall_s": wall_s}
    for site, values in per_site.items():
        flat |= {f"site_{site:02d}/{k.replace('-', '_')}": float(v) for k, v in values.items()
                 if k != "site" and not isinstance(v, list)}
    return flat
