"""Checkpoint files: nested state as safetensors + JSON under a SHA-256 manifest, and round folders.

Checkpoints never unpickle: tensors are safetensors, metadata JSON, and every file is listed with its sha256 in
a manifest (``checkpoint.sha256``, `sha256sum -c` format) written last and checked before anything is parsed, so
a flipped byte, an edited JSON or a pickle dropped in a checkpoint's place is refused in one line. The manifest
guards against corruption and tampering with single files, not against someone able to rewrite the manifest too.

The Trainer writes one checkpoint per stage folder; the federation server writes one per round
(``round_NNNN/``) and a ``LATEST`` pointer to the newest complete round.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save
from torch import Tensor

from echoflow.errors import EchoFlowError
from echoflow.verified import json_object, load_safetensors, read_verified, write_verified

LATEST = "LATEST"
"""File in a federation's checkpoint folder naming its newest complete round folder."""


def flatten_state(state: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split a nested state dict into tensors (for safetensors) and a JSON-able skeleton referring to them."""
    tensors: dict[str, Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, Tensor):
            tensors[path] = node.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(node, Mapping):
            return {"__keys__": [[_key(k), walk(v, f"{path}.{k}")] for k, v in node.items()]}
        if isinstance(node, list | tuple):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        return node

    skeleton = walk(state, prefix or "state")
    return tensors, {"state": skeleton}


def _key(key: Any) -> Any:
    return key if isinstance(key, str | int) else str(key)


def unflatten_state(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_state`."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict) and "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if isinstance(node, dict) and "__keys__" in node:
            return {k: walk(v) for k, v in node["__keys__"]}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    result = walk(meta["state"])
    if not isinstance(result, dict):
        raise EchoFlowError("checkpoint: malformed state skeleton")
    return result


CHECKPOINT_MANIFEST = "checkpoint.sha256"


def save_checkpoint(directory: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write tensors (safetensors), metadata (JSON) and their manifest (`write_verified`); returns the weights."""
    write_verified(directory / CHECKPOINT_MANIFEST, {"checkpoint.safetensors": save(tensors),
                                                     "checkpoint.json": json.dumps(meta, indent=1).encode()})
    return directory / "checkpoint.safetensors"


def load_checkpoint(directory: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`, verified against its manifest (no pickle involved)."""
    files = read_verified(directory / CHECKPOINT_MANIFEST, {"checkpoint.safetensors", "checkpoint.json"})
    return load_safetensors(directory / "checkpoint.safetensors", files["checkpoint.safetensors"]), json_object(
        directory / "checkpoint.json", files["checkpoint.json"])


def latest_round(directory: Path) -> Path | None:
    """The folder of the newest complete round in ``directory``, or None when there is none."""
    pointer = directory / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not re.fullmatch(r"round_\d{4,}", name):  # a pointer must not lead out of the checkpoint folder
        raise EchoFlowError(f"{pointer}: expected a round folder name, got {name[:40]!r}")
    folder = directory / name
    if not folder.is_dir():
        raise EchoFlowError(f"{pointer}: points at missing {folder.name}")
    return folder
