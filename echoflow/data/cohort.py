"""Where a run's sites are: the user's site folders, or a phantom cohort generated once in the workdir."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from echoflow.data.phantom import generate_cohort
from echoflow.errors import EchoFlowError


def cohort_roots(data: Mapping[str, Any], *, workdir: Path, seed: int) -> list[Path]:
    """The site folders of the ``data`` config group: ``data.roots``, or a phantom cohort in ``<workdir>/cohort``.

    The phantom (``data.source=phantom``) is generated on first use and reused after (a ``done`` marker).
    """
    if data["source"] != "phantom":
        if not data["roots"]:
            raise EchoFlowError(f"data.roots: give one folder per site for data.source={data['source']}")
        return [Path(root) for root in data["roots"]]
    out = workdir / "cohort"
    marker = out / "done"
    if not marker.exists():
        generate_cohort(out, sites=data["sites"], patients_per_site=data["patients_per_site"], seed=seed,
                        size=data["size"], frames=data["frames"])
        marker.write_text("ok\n")
    return sorted(path for path in out.iterdir() if path.is_dir())
