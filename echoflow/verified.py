"""Files verified by a SHA-256 manifest before anything parses them: weights, checkpoints, audit indexes.

`write_verified` writes the files, then a ``sha256sum``-format manifest; `read_verified` refuses a file whose bytes
differ from it, so a tampered or swapped file (a pickle in place of safetensors, an edited JSON) is refused in one
line before any parser sees it. `load_safetensors` and `json_object` then read the verified bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load
from torch import Tensor

from echoflow.errors import EchoFlowError


def load_safetensors(path: Path, data: bytes) -> dict[str, Tensor]:
    """Tensors from the verified bytes of ``path``; a malformed file is an ``EchoFlowError``."""
    try:
        return load(data)
    except (SafetensorError, ValueError) as err:
        raise EchoFlowError(f"{path}: not a safetensors file ({err})") from err


def json_object(path: Path, data: bytes) -> dict[str, Any]:
    """The JSON object in the verified bytes of ``path``; anything else is an ``EchoFlowError``."""
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise EchoFlowError(f"{path}: not JSON ({err})") from err
    if not isinstance(meta, dict):
        raise EchoFlowError(f"{path}: expected a JSON object")
    return meta


def write_verified(manifest: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` (name -> content) next to ``manifest``, then the manifest of their sha256 digests.

    Every file goes to a temp file first and is renamed into place, the manifest last: a crash leaves either the
    old manifest (which then refuses the half-new files) or a complete new checkpoint, never a silent mix.
    """
    manifest.parent.mkdir(parents=True, exist_ok=True)
    listing = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in files.items())
    contents = {**files, manifest.name: listing.encode()}
    for name, data in contents.items():
        (manifest.parent / f"{name}.tmp").write_bytes(data)
    for name in contents:
        (manifest.parent / f"{name}.tmp").replace(manifest.parent / name)


def read_verified(manifest: Path, names: Collection[str]) -> dict[str, bytes]:
    """The files ``names`` next to ``manifest`` (name -> content), each checked against its listed sha256.

    Raises:
        EchoFlowError: the manifest is missing, malformed or lists other files than ``names``, or a file is
            missing or differs from its digest.
    """
    try:
        lines = manifest.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise EchoFlowError(f"{manifest}: manifest missing or unreadable, refusing an unverifiable file "
                            f"({type(err).__name__})") from err
    files: dict[str, bytes] = {}
    for line in lines:
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or Path(name).name != name or name in (".", ".."):
            raise EchoFlowError(f"{manifest}: malformed manifest line {line[:80]!r}")
        path = manifest.parent / name
        try:
            data = path.read_bytes()
        except OSError as err:
            raise EchoFlowError(f"{path}: listed in {manifest.name} but unreadable ({type(err).__name__})") from err
        if hashlib.sha256(data).hexdigest() != digest:
            raise EchoFlowError(f"{path}: sha256 differs from {manifest.name}: corrupted or tampered, refusing it")
        files[name] = data
    if set(files) != set(names):
        raise EchoFlowError(f"{manifest}: lists {sorted(files)}, expected {sorted(names)}")
    return files
