"""Line up finished runs side by side: the config keys that differ between them and their headline metrics.

What MLflow's compare view shows, as a table for the terminal (`echoflow runs compare`): e.g. pipeline runs
under ``dp=none`` vs ``dp=eps8`` vs ``federation.sites=2,8``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from echoflow.errors import EchoFlowError

#: Config keys that differ between runs without meaning a different experiment (where a run wrote its files).
LOCATION_KEYS = ("workdir", "*_dir", "*_root", "mlflow.*")
#: Metrics shown when none are asked for: the parity table's pooled MAE, EF consistency, Fréchet distance.
HEADLINE = ("parity.*.pooled.mae", "consistency_r2", "frechet_reid", "released")


@dataclass(frozen=True)
class Comparison:
    """Runs as rows; ``params`` are the config keys whose values differ, ``metrics`` the metric columns."""

    run_ids: list[str]
    params: list[str]
    metrics: list[str]
    values: list[dict[str, str]]  #: per run, param or metric name -> printed value ('' when missing)


def find_runs(tracking_uri: str, experiment: str, *, run_name: str, limit: int) -> list[Run]:
    """The newest ``limit`` top-level runs named ``run_name`` in ``experiment``, oldest first.

    Raises:
        EchoFlowError: when the experiment does not exist.
    """
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise EchoFlowError(f"{tracking_uri}: no MLflow experiment {experiment!r}")
    runs = client.search_runs([found.experiment_id], filter_string=f"attributes.run_name = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=limit * 4)
    top = [run for run in runs if "mlflow.parentRunId" not in run.data.tags][:limit]
    return top[::-1]


def compare_runs(runs: Sequence[Run], *, metrics: Sequence[str] = HEADLINE) -> Comparison:
    """The differing config keys (locations excluded) and the metrics matching ``metrics`` (glob patterns)."""
    keys = sorted({key for run in runs for key in run.data.params})
    differing = [key for key in keys if len({run.data.params.get(key) for run in runs}) > 1
                 and not any(fnmatch.fnmatch(key, pattern) for pattern in LOCATION_KEYS)]
    names = sorted({key for run in runs for key in run.data.metrics
                    if any(fnmatch.fnmatch(key, pattern) for pattern in metrics)})
    values = [{**{key: run.data.params.get(key, "") for key in differing},
               **{key: f"{run.data.metrics[key]:.4g}" if key in run.data.metrics else "" for key in names}}
              for run in runs]
    return Comparison(run_ids=[run.info.run_id for run in runs], params=differing, metrics=names, values=values)
