"""No pickle from outside: checkpoints and weights load only as verified safetensors + JSON.

A tampered checkpoint (a flipped byte, an edited JSON sidecar, a pickle dropped in its place, a missing or
rewritten manifest) is refused with one line naming the file, and a pickle is never unpickled.
"""

import ast
import hashlib
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from echoflow.audit.index import build_index, load_index
from echoflow.checkpoints import CHECKPOINT_MANIFEST, load_checkpoint, save_checkpoint
from echoflow.config import load_config
from echoflow.errors import EchoFlowError
from echoflow.server.checkpoint import FederationState, load_latest, save_round
from echoflow.stages.networks import save_network
from echoflow.study.models import trained_network
from tests.test_stages import TINY, trainer

PACKAGE = Path(__file__).resolve().parents[1] / "echoflow"
MARKER_ENV = "ECHOFLOW_TEST_PICKLE_MARKER"
UNPICKLERS = ("pickle", "dill", "joblib", "cloudpickle", "shelve")


class Exploit:
    """Unpickling this creates the file named by $ECHOFLOW_TEST_PICKLE_MARKER: proof that a pickle ran."""

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (f'touch "${MARKER_ENV}"',)


def pickle_bytes() -> bytes:
    return pickle.dumps({"state": Exploit()})


def rewrite_manifest(directory: Path) -> None:
    """What an attacker able to write the whole folder does: a manifest matching the tampered files."""
    names = ("checkpoint.safetensors", "checkpoint.json")
    (directory / CHECKPOINT_MANIFEST).write_text("".join(
        f"{hashlib.sha256((directory / n).read_bytes()).hexdigest()}  {n}\n" for n in names))


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def edit_json(path: Path) -> None:
    meta = json.loads(path.read_text())
    meta["step"] = 999
    path.write_text(json.dumps(meta))


def pickle_and_matching_manifest(directory: Path) -> None:
    (directory / "checkpoint.safetensors").write_bytes(pickle_bytes())
    rewrite_manifest(directory)


def json_list_and_matching_manifest(directory: Path) -> None:
    (directory / "checkpoint.json").write_text("[1, 2]")
    rewrite_manifest(directory)


def manifest_of_weights_only(directory: Path) -> None:
    manifest = directory / CHECKPOINT_MANIFEST
    manifest.write_text(manifest.read_text().splitlines()[0] + "\n")


# case -> (tamper with the checkpoint folder, words of the refusal)
TAMPERING: dict[str, tuple[Callable[[Path], None], str]] = {
    "flipped byte in the weights": (lambda d: flip_last_byte(d / "checkpoint.safetensors"),
                                    "checkpoint.safetensors: sha256 differs from checkpoint.sha256"),
    "edited JSON sidecar": (lambda d: edit_json(d / "checkpoint.json"),
                            "checkpoint.json: sha256 differs from checkpoint.sha256"),
    "pickle in place of the weights": (lambda d: (d / "checkpoint.safetensors").write_bytes(pickle_bytes()),
                                       "checkpoint.safetensors: sha256 differs"),
    "pickle with a matching manifest": (pickle_and_matching_manifest, "checkpoint.safetensors: not a safetensors"),
    "JSON list with a matching manifest": (json_list_and_matching_manifest, "checkpoint.json: expected a JSON object"),
    "manifest deleted": (lambda d: (d / CHECKPOINT_MANIFEST).unlink(), "checkpoint.sha256: manifest missing"),
    "manifest naming a file outside": (
        lambda d: (d / CHECKPOINT_MANIFEST).write_text(f"{'0' * 64}  ../../etc/passwd\n"),
        "checkpoint.sha256: malformed manifest line"),
    "manifest listing the weights only": (manifest_of_weights_only,
                                          "checkpoint.sha256: lists ['checkpoint.safetensors'], expected"),
}


@pytest.fixture
def checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(MARKER_ENV, str(tmp_path / "pwned"))
    save_checkpoint(tmp_path / "ckpt", {"w": torch.arange(6.0)}, {"step": 3})
    return tmp_path / "ckpt"


def test_checkpoint_round_trip_writes_a_sha256sum_manifest(checkpoint: Path) -> None:
    tensors, meta = load_checkpoint(checkpoint)
    assert torch.equal(tensors["w"], torch.arange(6.0)) and meta == {"step": 3}
    listed = dict(reversed(line.split("  ")) for line in (checkpoint / CHECKPOINT_MANIFEST).read_text().splitlines())
    assert listed == {n: hashlib.sha256((checkpoint / n).read_bytes()).hexdigest()
                      for n in ("checkpoint.safetensors", "checkpoint.json")}
    assert sorted(p.name for p in checkpoint.iterdir()) == ["checkpoint.json", "checkpoint.safetensors",
                                                            CHECKPOINT_MANIFEST]  # no temp files left


def test_the_exploit_pickle_really_runs_when_unpickled(checkpoint: Path) -> None:
    """Guards the tampering test: its pickle must be one that would do harm if anything unpickled it."""
    pickle.loads(pickle_bytes())  # the point of this test
    assert (checkpoint.parent / "pwned").exists()


@pytest.mark.parametrize("case", list(TAMPERING))
def test_a_tampered_checkpoint_is_refused_in_one_line(checkpoint: Path, case: str) -> None:
    tamper, words = TAMPERING[case]
    tamper(checkpoint)
    with pytest.raises(EchoFlowError) as err:
        load_checkpoint(checkpoint)
    assert words in str(err.value) and str(checkpoint) in str(err.value) and "\n" not in str(err.value)
    assert not (checkpoint.parent / "pwned").exists()


def test_trainer_resume_refuses_a_tampered_checkpoint(tmp_path: Path) -> None:
    trainer("ef").fit(lambda: {"clip": torch.zeros(2, 1, 4, 32, 32), "ef": torch.ones(2)}, steps=1,
                      checkpoint_dir=tmp_path, quiet=True)
    edit_json(tmp_path / "checkpoint.json")
    with pytest.raises(EchoFlowError, match=r"checkpoint\.json: sha256 differs"):
        trainer("ef").resume(tmp_path)


def test_a_tampered_global_round_is_refused(tmp_path: Path) -> None:
    save_round(tmp_path, FederationState(round=1, arrays={"model.w": torch.ones(3)}))
    assert load_latest(tmp_path) is not None
    flip_last_byte(tmp_path / "round_0001" / "checkpoint.safetensors")
    with pytest.raises(EchoFlowError, match=r"round_0001/checkpoint.safetensors: sha256 differs"):
        load_latest(tmp_path)


def test_a_round_pointer_leading_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    save_round(tmp_path / "elsewhere", FederationState(round=1, arrays={"model.w": torch.ones(3)}))
    save_round(tmp_path / "ckpt", FederationState(round=1, arrays={"model.w": torch.zeros(3)}))
    (tmp_path / "ckpt" / "LATEST").write_text("../elsewhere/round_0001")
    with pytest.raises(EchoFlowError, match=r"LATEST: expected a round folder name, got '\.\./elsewhere"):
        load_latest(tmp_path / "ckpt")


def test_final_weights_are_verified_too(tmp_path: Path) -> None:
    cfg = load_config([*TINY, f"workdir={tmp_path}"])
    weights = tmp_path / "ef" / "model.safetensors"
    save_network(trainer("ef").averaged_model(), weights)
    assert trained_network(cfg, "ef") is not None and (tmp_path / "ef" / "model.sha256").is_file()
    flip_last_byte(weights)
    with pytest.raises(EchoFlowError, match=r"model.safetensors: sha256 differs from model.sha256"):
        trained_network(cfg, "ef")


def unsafe_loads(tree: ast.AST) -> list[str]:
    """Calls that may unpickle.

    torch.load without weights_only=True, anything from pickle/dill/joblib/cloudpickle/shelve, pandas'
    read_pickle, an Unpickler, np.load with allow_pickle other than False.
    """
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if ((name == "torch.load" and keywords.get("weights_only") != "True")
                or name.split(".")[0] in UNPICKLERS or name.endswith(("read_pickle", "Unpickler"))
                or (name in ("np.load", "numpy.load") and keywords.get("allow_pickle", "False") != "False")):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_code_path_unpickles() -> None:
    found = {str(path.relative_to(PACKAGE)): calls for path in sorted(PACKAGE.rglob("*.py"))
             if (calls := unsafe_loads(ast.parse(path.read_text())))}
    assert found == {}


def test_the_unpickle_scan_catches_what_it_should() -> None:
    code = ("torch.load(f)\ntorch.load(f, weights_only=True)\npickle.loads(b)\nnp.load(f, allow_pickle=True)\n"
            "np.load(f)\npd.read_pickle(f)\njoblib.load(f)\n")
    assert [line.split(":")[0] for line in unsafe_loads(ast.parse(code))] == [
        "line 1", "line 3", "line 4", "line 6", "line 7"]


def index_pickle_with_matching_manifest(path: Path) -> None:
    path.write_bytes(pickle_bytes())
    names = (path.name, path.with_suffix(".json").name)
    path.with_suffix(".sha256").write_text("".join(
        f"{hashlib.sha256((path.parent / n).read_bytes()).hexdigest()}  {n}\n" for n in names))


@pytest.mark.parametrize(("tamper", "words"), [
    (flip_last_byte, "index.faiss: sha256 differs from index.sha256"),
    (lambda p: flip_last_byte(p.with_suffix(".json")), "index.json: sha256 differs from index.sha256"),
    (index_pickle_with_matching_manifest, "index.faiss: not a FAISS index"),
], ids=["flipped byte in the index", "edited sidecar", "pickle with a matching manifest"])
def test_a_tampered_audit_index_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           tamper: Callable[[Path], None], words: str) -> None:
    monkeypatch.setenv(MARKER_ENV, str(tmp_path / "pwned"))
    vectors = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    build_index(vectors, kind="exact").save(tmp_path / "index.faiss")
    assert load_index(tmp_path / "index.faiss").ntotal == 40
    tamper(tmp_path / "index.faiss")
    with pytest.raises(EchoFlowError) as err:
        load_index(tmp_path / "index.faiss")
    assert words in str(err.value) and "\n" not in str(err.value) and not (tmp_path / "pwned").exists()
