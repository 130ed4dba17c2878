"""`run_audit` and `echoflow audit run` end to end on a tiny phantom cohort.

The networks are untrained tiny ones with fixed random weights (a fake re-id: training is too slow for a unit
test); the trained demo models are checked by hand (see the issue note). What must hold for any encoder: exact
copies of real training frames are caught (similarity 1 ≥ τ), canaries never reach ``released/``, nothing is
released when a site fails, and the report validates and has no external URL.
"""

import hashlib
import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import echoflow.audit.run as run_module
from echoflow.audit.release import read_generated, release_videos
from echoflow.audit.report import SCHEMA_PATH
from echoflow.audit.run import AuditSettings, run_audit
from echoflow.cli import app
from echoflow.data.echonet import load_video, read_cohort
from echoflow.data.phantom import generate_cohort
from echoflow.data.sites import SiteData, load_sites
from echoflow.models.reid import ReidEncoder
from echoflow.models.vae import AdversarialVAE
from echoflow.stages.networks import save_network
from echoflow.study.generate import write_synthetic

torch.set_num_threads(1)
SIZE, FRAMES = 32, 12
TINY = ["data.sites=2", "data.patients_per_site=10", f"data.size={SIZE}", f"data.frames={FRAMES}",
        "model.vae.base_channels=8", "model.reid.channels=8", "model.reid.dim=16"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """2 phantom sites × 10 patients (32 px, 8 frames), tiny random networks, a fresh cohort (another seed)."""
    root = tmp_path_factory.mktemp("world")
    roots = generate_cohort(root / "cohort", sites=2, patients_per_site=10, seed=0, size=SIZE, frames=FRAMES)
    fresh = load_sites(generate_cohort(root / "fresh", sites=1, patients_per_site=10, seed=7, size=SIZE,
                                       frames=FRAMES), size=SIZE, splits=["TRAIN", "VAL", "TEST"])[0]
    torch.manual_seed(0)
    return {"root": root, "roots": roots, "vae": AdversarialVAE(base_channels=8).eval(),
            "reid": ReidEncoder(channels=8, dim=16).eval(), "fresh": fresh,
            "train": load_sites(roots, size=SIZE, splits=["TRAIN"]),
            "heldout": load_sites(roots, size=SIZE, splits=["VAL", "TEST"])}


def as_generated(folder: Path, sites: list[SiteData]) -> Path:
    """Write the sites' videos as if generated (EchoNet layout, SYN names)."""
    videos = np.stack([v for site in sites for v in site.videos])
    write_synthetic(folder, videos, np.full(len(videos), 50.0), fps=25.0)
    return folder


def audit_of(world: dict, generated: Path, out: Path, **settings: object) -> run_module.AuditOutcome:
    return run_audit(vae=world["vae"], reid=world["reid"], train=world["train"], heldout=world["heldout"],
                     generated_dir=generated, out=out, index_dir=out / "indexes",
                     settings=AuditSettings(**settings))  # type: ignore[arg-type]


def released_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "released" / "Videos").glob("*")) if (out / "released").exists() else []


def test_exact_copies_all_withheld(world: dict, tmp_path: Path) -> None:
    generated = as_generated(tmp_path / "gen", world["train"])
    outcome = audit_of(world, generated, tmp_path / "out")
    assert outcome.report["counts"]["withheld"] == outcome.report["counts"]["generated"] > 0
    assert not any(d.release for d in outcome.decisions) and released_files(tmp_path / "out") == []
    first = outcome.report["samples"][0]  # the nearest real frame of a copy is the frame it copies
    assert first["similarity"] == pytest.approx(1.0, abs=1e-4) and (first["real_video"], first["real_frame"]) == (
        world["train"][0].records[0].file_name, 0)


def test_fresh_patients_released_canaries_caught_never_released(world: dict, tmp_path: Path) -> None:
    generated = as_generated(tmp_path / "gen", [world["fresh"]])
    out = tmp_path / "out"
    outcome = audit_of(world, generated, out, canaries=20, every=2)
    report = outcome.report
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    genuine = [s for s in report["samples"] if not s["canary"]]
    withheld = np.mean([not s["release"] for s in genuine])
    print(f"fresh frames withheld {withheld:.3f}; canaries {report['canaries']}")
    assert withheld <= 0.10  # τ = p95 of held-out frames: ~5 % expected; the bound leaves room for 60 frames
    assert report["canaries"]["exact"]["caught"] == report["canaries"]["exact"]["planted"] == 4
    assert sum(s["canary"] for s in report["samples"]) == 20
    # released/ holds exactly the released videos, byte for byte, and no canary
    released = {d.file_name for d in outcome.decisions if d.release}
    assert released and released_files(out) == sorted(f"{n}.avi" for n in released)
    for record in read_cohort(out / "released").records:
        assert record.path.read_bytes() == (generated / "Videos" / record.path.name).read_bytes()
    html = (out / "audit.html").read_text()
    assert "data:image/png;base64" in html and not re.search(r"(src|href)=['\"](https?:)?//", html)
    assert "http://" not in html and "https://" not in html
    # counts: videos and frames apart, canaries never counted as generated, every=k and partial videos shown
    counts, frames = report["counts"], len(genuine)
    assert counts["generated"] == frames and counts["released"] + counts["withheld"] == frames
    assert counts["released"] == sum(s["release"] for s in genuine)
    assert counts["canaries"] == 20 and counts["every"] == 2
    assert counts["videos"] == len(outcome.decisions) and counts["videos_released"] == len(released)
    assert counts["videos_partially_audited"] == len(outcome.decisions)  # every=2: each video's odd frames skipped
    assert f"every 2nd frame: {counts['videos_partially_audited']} of {counts['videos']} videos partially" in html
    assert f"{counts['videos_released']} / {counts['videos']}" in html


def test_video_withheld_if_any_frame_is(world: dict, tmp_path: Path) -> None:
    fresh = world["fresh"].videos[0].copy()
    fresh[3] = world["train"][1].videos[2][5]  # one copied frame in an otherwise fresh video
    write_synthetic(tmp_path / "gen", np.stack([fresh, world["fresh"].videos[1]]), np.array([50.0, 50.0]), fps=25.0)
    outcome = audit_of(world, tmp_path / "gen", tmp_path / "out")
    spliced = outcome.decisions[0]
    assert not spliced.release and spliced.site == world["train"][1].name
    assert (spliced.real_video, spliced.real_frame) == (world["train"][1].records[2].file_name, 5)


def test_release_refuses_a_file_changed_after_its_audit(world: dict, tmp_path: Path) -> None:
    generated = as_generated(tmp_path / "gen", [world["fresh"]])
    outcome = audit_of(world, generated, tmp_path / "out")
    passing = [d for d in outcome.decisions if d.release]
    gen = read_generated(generated, size=SIZE)
    victim = generated / "Videos" / f"{passing[0].file_name}.avi"
    victim.write_bytes(victim.read_bytes() + b"\0")
    released = release_videos(gen, outcome.decisions, tmp_path / "again")
    assert passing[0].file_name not in {r.file_name for r in released} and len(released) == len(passing) - 1


class FailingIndex:
    def __init__(self, index: object) -> None:
        self.index = index

    def __getattr__(self, name: str) -> object:
        return getattr(self.index, name)

    def search(self, queries: np.ndarray, *, k: int = 1, threshold: float | None = None) -> object:
        raise RuntimeError("disk on fire")


@pytest.fixture
def workdir(world: dict, tmp_path: Path) -> Path:
    """A workdir with the tiny networks saved as trained models and the world's cohort."""
    save_network(world["vae"], tmp_path / "vae" / "model.safetensors")
    save_network(world["reid"], tmp_path / "reid" / "model.safetensors")
    (tmp_path / "cohort").symlink_to(world["root"] / "cohort")
    return tmp_path


def cli(workdir: Path, generated: Path, *extra: str) -> object:
    args = ["audit", "run", "--generated", str(generated), "--out", str(workdir / "out"), f"workdir={workdir}",
            f"mlflow.tracking_uri=sqlite:///{workdir}/mlflow.db", *TINY, *extra]
    return CliRunner().invoke(app, args)


def test_cli_failing_site_exits_nonzero_releases_nothing(world: dict, workdir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    generated = as_generated(workdir / "gen", [world["fresh"]])
    ok = cli(workdir, generated)
    assert ok.exit_code == 0, ok.output  # type: ignore[attr-defined]
    assert released_files(workdir / "out")
    real_build, calls = run_module.build_index, []

    def second_site_fails(vectors: np.ndarray, **kw: object) -> object:
        calls.append(1)
        return FailingIndex(real_build(vectors, **kw)) if len(calls) == 2 else real_build(vectors, **kw)

    monkeypatch.setattr(run_module, "build_index", second_site_fails)
    failed = cli(workdir, generated)
    assert failed.exit_code != 0 and "site_01" in str(failed.exception)  # type: ignore[attr-defined]
    assert released_files(workdir / "out") == []
    report = json.loads((workdir / "out" / "audit.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    assert report["status"] == "failed" and "disk on fire" in json.dumps(report["failures"])
    assert "site_01" in json.dumps(report["failures"])


def test_the_audited_pixels_are_decoded_from_exactly_the_bytes_hashed(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file swapped between the hash and the decode must not get the first file's hash with its own pixels."""
    generated = as_generated(tmp_path / "gen", [world["fresh"]])
    victim = sorted((generated / "Videos").glob("*.avi"))[0]
    original, swap = victim.read_bytes(), sorted((generated / "Videos").glob("*.avi"))[1].read_bytes()
    (tmp_path / "original.avi").write_bytes(original)
    read_bytes = Path.read_bytes

    def read_then_swap(path: Path) -> bytes:
        data = read_bytes(path)
        if path == victim:
            victim.write_bytes(swap)  # the swap lands right after the audit read the file
        return data

    monkeypatch.setattr(Path, "read_bytes", read_then_swap)
    gen = read_generated(generated, size=SIZE)
    row = [r.path for r in gen.records].index(victim)
    assert gen.sha256[row] == hashlib.sha256(original).hexdigest()
    np.testing.assert_array_equal(gen.videos[row], load_video(tmp_path / "original.avi", size=SIZE))
