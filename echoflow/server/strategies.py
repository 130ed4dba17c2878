"""Aggregation strategies by name (Flower's message-API strategies) and their resumable state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)
from torch import Tensor

from echoflow.errors import EchoFlowError

#: Attributes holding a strategy's state between rounds: FedAdam/FedYogi's server moments and last weights
#: (dicts of arrays); FedAvgM's server momentum (a list, in the order of the weights' keys) — its last weights
#: are the global weights the loop hands it anyway.
STATE_ATTRIBUTES = ("current_arrays", "m_t", "v_t")
MOMENTUM = "momentum_vector"
NAMES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "cyclic")


class CyclicWeightTransfer(FedAvg):
    """Cyclic weight transfer (Chang et al., 2018): the sampled sites train in turn, not side by side.

    Each site starts from the weights the previous site sent back, so a round makes ``sites x local_steps``
    sequential steps — as a centralized run does — instead of averaging ``sites`` parallel runs of
    ``local_steps``. Wall time grows by the same factor.

    The round loop runs the cycle (`echoflow.server.gather.gather_cyclic_training`); FedAvg's sampling and
    evaluation serve as they are, and nothing is aggregated. Each site sees the previous site's weights.
    """


@dataclass(frozen=True)
class StrategyConfig:
    """Strategy choice and hyper-parameters.

    Attributes:
        name: one of `NAMES`. fraction_train / fraction_evaluate: share of sites asked each round.
        min_nodes: sites that must be connected before a round starts.
        proximal_mu: FedProx μ. eta, eta_l, beta_1, beta_2, tau: FedAdam/FedYogi server optimiser.
        server_lr, server_momentum: FedAvgM's server SGD on the averaged update (lr 1, momentum 0 = FedAvg).
        trim_beta: FedTrimmedAvg's cut fraction per side. num_malicious: Krum's assumed Byzantine sites.
    """

    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 2
    proximal_mu: float = 0.01
    server_lr: float = 1.0
    server_momentum: float = 0.9
    eta: float = 1e-2
    eta_l: float = 1e-2
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    trim_beta: float = 0.2
    num_malicious: int = 0


def make_strategy(config: StrategyConfig) -> Strategy:
    """The Flower strategy named by ``config.name``."""
    common: dict[str, Any] = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_nodes,
        "min_evaluate_nodes": config.min_nodes if config.fraction_evaluate > 0 else 0,
        "min_available_nodes": config.min_nodes,
    }
    opt: dict[str, Any] = {"eta": config.eta, "eta_l": config.eta_l, "beta_1": config.beta_1, "beta_2": config.beta_2,
           "tau": config.tau}
    if config.name == "fedavg":
        return FedAvg(**common)
    if config.name == "fedavgm":
        return FedAvgM(**common, server_learning_rate=config.server_lr, server_momentum=config.server_momentum)
    if config.name == "fedprox":
        return FedProx(**common, proximal_mu=config.proximal_mu)
    if config.name == "fedadam":
        return FedAdam(**common, **opt)
    if config.name == "fedyogi":
        return FedYogi(**common, **opt)
    if config.name == "fedmedian":
        return FedMedian(**common)
    if config.name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=config.trim_beta)
    if config.name == "cyclic":
        return CyclicWeightTransfer(**common)
    if config.name == "krum":
        return Krum(**common, num_malicious_nodes=config.num_malicious)
    raise EchoFlowError(f"strategy.name: unknown strategy {config.name!r} (choose from {', '.join(NAMES)})")


def strategy_state(strategy: Strategy) -> dict[str, Tensor]:
    """The strategy's state as tensors ``"<attr>/<key>"`` (empty for stateless strategies)."""
    state: dict[str, Tensor] = {}
    if isinstance(strategy, FedAvgM):
        values = dict(enumerate(strategy.momentum_vector or []))
        return {f"{MOMENTUM}/{i:05d}": torch.from_numpy(np.ascontiguousarray(v)) for i, v in values.items()}
    for attr in STATE_ATTRIBUTES:
        for key, value in (getattr(strategy, attr, None) or {}).items():
            state[f"{attr}/{key}"] = torch.from_numpy(np.ascontiguousarray(value))
    return state


def load_strategy_state(strategy: Strategy, state: dict[str, Tensor]) -> None:
    """Restore `strategy_state` into a freshly made strategy of the same kind."""
    momentum = [v.numpy() for k, v in sorted(state.items()) if k.startswith(f"{MOMENTUM}/")]
    if momentum:
        if not isinstance(strategy, FedAvgM):
            raise EchoFlowError(f"checkpoint: strategy state {MOMENTUM!r} does not fit {type(strategy).__name__}")
        strategy.momentum_vector = momentum
    for attr in STATE_ATTRIBUTES:
        prefix = f"{attr}/"
        values = {k[len(prefix):]: v.numpy() for k, v in state.items() if k.startswith(prefix)}
        if values:
            if not hasattr(strategy, attr):
                raise EchoFlowError(f"checkpoint: strategy state {attr!r} does not fit {type(strategy).__name__}")
            setattr(strategy, attr, values)
