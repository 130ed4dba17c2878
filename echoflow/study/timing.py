"""Where the main job spends its time: wall seconds per pipeline step, kept across resumed runs.

`StepTimes` measures each step (and the work steps share lazily, such as loading the models or embedding the
real frames, which runs inside the first step that needs it) and keeps the record in
``<workdir>/summary/step_seconds.json``; a step finished in an earlier run keeps its time from then. `write_timing`
writes the table to ``<workdir>/summary/timing.{json,md}`` and logs ``timing.<step>_s`` metrics and the table
to MLflow.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import mlflow

T = TypeVar("T")


class StepTimes:
    """Wall seconds per step, persisted in ``<workdir>/summary/step_seconds.json`` (step -> seconds, run order).

    Nested measurements (a shared cache filled inside a step) are recorded under their own name and also
    counted in the enclosing step; `rows` marks them as included.
    """

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "summary" / "step_seconds.json"
        self.seconds: dict[str, float] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.inside: dict[str, str] = {}
        self._open: list[str] = []
        self._this_run: set[str] = set()

    def measure(self, name: str, work: Callable[[], T]) -> T:
        """Run ``work()`` and record its wall time under ``name`` (replacing a record from an earlier run)."""
        if self._open:
            self.inside[name] = self._open[-1]
        self._open.append(name)
        start = time.perf_counter()
        try:
            return work()
        finally:
            self._open.pop()
            earlier = self.seconds.get(name, 0.0) if name in self._this_run else 0.0
            self.seconds[name] = earlier + time.perf_counter() - start
            self._this_run.add(name)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.seconds, indent=1))

    def rows(self, extra: Mapping[str, float] = {}) -> list[dict[str, Any]]:
        """Table rows: step, seconds, share of the total of top-level steps, and the step it ran inside."""
        total = sum(s for name, s in self.seconds.items() if name not in self.inside) or 1.0
        rows = [{"step": name, "seconds": round(s, 1), "share": round(s / total, 3),
                 "inside": self.inside.get(name, "")} for name, s in self.seconds.items()]
        rows += [{"step": name, "seconds": round(s, 1), "share": round(s / total, 3), "inside": "models"}
                 for name, s in extra.items()]
        return rows


def federated_stage_seconds(history: Mapping[str, list[Mapping[str, Any]]]) -> dict[str, float]:
    """``train <stage>``: the sum of the stage's federated round wall times (from the round history)."""
    return {f"train {stage}": float(sum(entry.get("wall_s", 0.0) for entry in rounds))
            for stage, rounds in history.items()}


def write_timing(workdir: Path, times: StepTimes, *, extra: Mapping[str, float] = {}) -> list[dict[str, Any]]:
    """Write ``summary/timing.{json,md}`` (and the rows into ``summary/summary.json``); log them to MLflow."""
    rows = times.rows(extra)
    out = workdir / "summary"
    out.mkdir(parents=True, exist_ok=True)
    (out / "timing.json").write_text(json.dumps(rows, indent=1))
    if (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
        (out / "summary.json").write_text(json.dumps(summary | {"timing": rows}, indent=1))
    lines = ["| step | wall s | share of the run | inside |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['seconds']:.1f} | {r['share']:.1%} | {r['inside']} |" for r in rows]
    (out / "timing.md").write_text("\n".join(lines) + "\n")
    if mlflow.active_run() is not None:
        mlflow.log_metrics({f"timing.{r['step'].replace(' ', '_')}_s": float(r["seconds"]) for r in rows})
        mlflow.log_table({k: [r[k] for r in rows] for k in ("step", "seconds", "share", "inside")},
                         "summary/timing_table.json")
    return rows
