"""Each stage's main network: built from the ``model`` config group, saved and loaded as verified safetensors.

A trained stage lives in ``<folder>/model.safetensors`` with its SHA-256 in ``<folder>/model.sha256``; a federated
stage's global weights live in its round checkpoints (``global/model.*``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save
from torch import nn

from echoflow.checkpoints import load_checkpoint
from echoflow.errors import EchoFlowError
from echoflow.models.ef import EFRegressor
from echoflow.models.image_flow import LatentImageFlow
from echoflow.models.reid import ReidEncoder
from echoflow.models.vae import AdversarialVAE
from echoflow.models.video_flow import LatentVideoFlow
from echoflow.stages import STAGES
from echoflow.verified import load_safetensors, read_verified, write_verified

_NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "vae": AdversarialVAE,
    "image_flow": LatentImageFlow,
    "reid": ReidEncoder,
    "video_flow": LatentVideoFlow,
    "ef": EFRegressor,
}


def build_network(name: str, model: Mapping[str, Any]) -> nn.Module:
    """The main network of stage ``name`` from the ``model`` config group (constructor kwargs per network)."""
    if name not in _NETWORKS:
        raise EchoFlowError(f"stage: unknown {name!r}; choose one of {', '.join(STAGES)}")
    return _NETWORKS[name](**model[name])


def save_network(net: nn.Module, path: Path) -> None:
    """Final weights as safetensors (no pickle), listed with their sha256 in ``<stem>.sha256``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    write_verified(path.with_suffix(".sha256"), {path.name: save(tensors)})


def load_network(name: str, model: Mapping[str, Any], path: Path) -> nn.Module:
    """Stage ``name``'s network (``model`` config group) with the weights saved at ``path``, in eval mode."""
    if not path.exists():
        raise EchoFlowError(f"{path}: no trained {name} model; run `echoflow train {name}` first")
    net = build_network(name, model)
    try:
        net.load_state_dict(load_safetensors(path, read_verified(path.with_suffix(".sha256"), [path.name])[path.name]))
    except RuntimeError as err:
        raise EchoFlowError(f"{path}: weights do not fit the configured {name} network "
                            "(was the model config changed?)") from err
    return net.eval()


def global_network(stage: str, model: Mapping[str, Any], round_folder: Path) -> nn.Module:
    """Stage ``stage``'s network (``model`` config) with the global ``model`` weights of a round checkpoint."""
    tensors, _ = load_checkpoint(round_folder)
    prefix = "global/model."
    net = build_network(stage, model)
    net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return net
