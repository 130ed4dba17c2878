"""DP for a loss that couples the items of a batch (re-id's InfoNCE): clip the whole batch's gradient, not each item's.

Re-id's InfoNCE uses every other patient of the batch as a negative, so item i's gradient depends on patient j:
per-item clipping then bounds nothing per patient (removing j changes every item's gradient). What is bounded is
the batch: with f(B) = clip_C(∇ L(B)), removing or adding one patient changes f by at most 2C, so

    f(B) + N(0, (2σC)² I)

is the sampled Gaussian mechanism with noise multiplier σ (Mironov, Talwar & Zhang 2019 analyse it for any f of
sensitivity 1 on the Poisson-sampled set) — the same (σ, q) the site's accountant counts for the stage. It is
noisier per step than per-item DP-SGD (the signal is one clipped mean gradient, not a sum of B clipped items),
but the guarantee is real, and it needs no per-sample gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: Stages whose loss couples a batch's items, trained with `BatchClippedOptimizer` under DP.
COUPLED_STAGES = frozenset({"reid"})


class BatchClippedOptimizer:
    """Wraps an optimiser: clip the batch gradient to C, add N(0, (2σC)²) from the site's secret generator, step.

    Args:
        optimizer: the wrapped optimiser (AdamW). noise_multiplier: σ. max_grad_norm: C.
        generator: the site's secret generator. on_step: called once per step (the ledger's count).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 generator: torch.Generator, on_step: Callable[[], None]) -> None:
        self.optimizer, self.noise_multiplier, self.max_grad_norm = optimizer, noise_multiplier, max_grad_norm
        self.generator, self.on_step = generator, on_step

    @property
    def params(self) -> list[nn.Parameter]:
        """Every parameter the optimiser trains."""
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # noqa: D102
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def privatize(self) -> None:
        """``p.grad`` <- clip_C(batch gradient) + N(0, (2σC)²), for every parameter (no gradient counts as 0)."""
        params = self.params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        factor = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        std = 2.0 * self.noise_multiplier * self.max_grad_norm
        total = sum(p.numel() for p in params)
        noise = torch.normal(0.0, std, (total,), generator=self.generator, device=grads[0].device,
                             dtype=grads[0].dtype)
        for p, g, chunk in zip(params, grads, noise.split([p.numel() for p in params]), strict=True):
            p.grad = g * factor + chunk.view_as(p)

    def step(self) -> None:
        """Privatise the gradient, step the wrapped optimiser, count the step."""
        self.privatize()
        self.optimizer.step()
        self.on_step()

    def register_step_post_hook(self, hook: Callable[..., None]) -> Any:  # noqa: D102
        return self.optimizer.register_step_post_hook(hook)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.optimizer.load_state_dict(state)
