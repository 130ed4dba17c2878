"""Earlier stages' global weights travelling in Flower messages, and the site's per-process store of them.

A latent stage (image flow, re-id, video flow) needs the federated VAE's final weights at every site. The server
attaches them to each message of the stage as an extra ``ArrayRecord`` named ``prior-<stage>``
(`echoflow.server.priors`); Flower moves every array as its own object, and the SuperLink stores an object sent to
many nodes once. The site keeps the weights in this process (`remember`), adds their digest to its task config
(`protocol.PRIOR_DIGESTS`), and the task asks for them back by digest (`recall`): a new VAE round is a new digest,
so the site's cached latents are never stale, and no site reads a folder it shares with the server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from flwr.app import ArrayRecord, Message
from torch import Tensor

from echoflow.errors import EchoFlowError
from echoflow.federation.protocol import PRIOR_RECORD

_STORE: dict[str, dict[str, Tensor]] = {}
"""This process's prior weights by digest (a handful of models at most: one per earlier stage and version)."""
MAX_KEPT = 4


def digest(arrays: Mapping[str, Tensor]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes (sorted by name), as hex."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        tensor = arrays[name].detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def prior_records(priors: Mapping[str, Mapping[str, Tensor]]) -> dict[str, ArrayRecord]:
    """``{stage: arrays}`` as the message records the server attaches (``prior-<stage>``)."""
    return {f"{PRIOR_RECORD}{stage}": ArrayRecord(dict(arrays)) for stage, arrays in priors.items()}


def remember(msg: Message) -> dict[str, str]:
    """Keep every prior a message carries in this process; returns ``{stage: digest}`` (empty when none)."""
    found = {}
    for name, record in msg.content.array_records.items():
        if name.startswith(PRIOR_RECORD):
            arrays = dict(record.to_torch_state_dict())
            key = digest(arrays)
            if key not in _STORE:
                while len(_STORE) >= MAX_KEPT:
                    _STORE.pop(next(iter(_STORE)))
                _STORE[key] = arrays
            found[name[len(PRIOR_RECORD):]] = key
    return found


def recall(stage: str, key: str) -> dict[str, Tensor]:
    """The prior weights of ``stage`` with digest ``key``, as received in a message of this process."""
    if key not in _STORE:
        raise EchoFlowError(f"prior weights of stage {stage!r} ({key[:12]}…): not received by this site process")
    return _STORE[key]
