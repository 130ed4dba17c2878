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
    return phantom_once(workdir / "cohort", data, patients=data["patients_per_site"], seed=seed)


def test_cohort_roots(data: Mapping[str, Any], *, workdir: Path, seed: int) -> list[Path]:
    """The held-out test cohort's site folders: ``data.test_patients`` unseen phantom patients per site, or none.

    The same sites (same site styles) as the training cohort, patients numbered after its ``patients_per_site``
    (so none of them is in it), every video in TEST; generated once in ``<workdir>/test_cohort``, with the seed the
    cohort was generated with (a later run under another ``seed``, e.g. a generation draw, gets the same sites).
    """
    patients = int(data.get("test_patients") or 0)
    if patients <= 0:
        return []
    if data["source"] != "phantom":
        raise EchoFlowError(f"data.test_patients: {patients}; an extra test cohort is generated only for "
                            f"data.source=phantom (got {data['source']}: use your sites' TEST split, test_patients=0)")
    return phantom_once(workdir / "test_cohort", data, patients=patients, seed=phantom_seed(workdir / "cohort", seed),
                        first_patient=data["patients_per_site"], split="TEST")


def phantom_once(out: Path, data: Mapping[str, Any], *, patients: int, seed: int, **which: Any) -> list[Path]:
    """A phantom cohort of ``data``'s sites in ``out``, made once (a ``done`` marker with its seed), then reused."""
    marker = out / "done"
    if not marker.exists():
        generate_cohort(out, sites=data["sites"], patients_per_site=patients, seed=seed, size=data["size"],
                        frames=data["frames"], **which)
        marker.write_text(f"seed {seed}\n")
    return sorted(path for path in out.iterdir() if path.is_dir())


def phantom_seed(out: Path, seed: int) -> int:
    """The seed the phantom in ``out`` was generated with; ``seed`` if none is there (or its marker predates seeds)."""
    marker = out / "done"
    words = marker.read_text().split() if marker.exists() else []
    return int(words[1]) if words[:1] == ["seed"] else seed
