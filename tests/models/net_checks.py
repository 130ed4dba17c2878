"""Checks shared by the flow-network tests: Opacus per-sample gradients and overfitting a fixed batch."""

from typing import Any

import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import Tensor, nn

from echoflow.models.flow import flow_matching_loss


def assert_opacus_per_sample_grads(model: nn.Module, x: Tensor, t: Tensor, **cond: Any) -> None:
    """Validator finds nothing, and Opacus' per-sample gradients are the gradients of each sample alone."""
    assert ModuleValidator.validate(model, strict=False) == []
    alone = [
        torch.autograd.grad(
            model(x[i : i + 1], t[i : i + 1], **{k: v[i : i + 1] for k, v in cond.items()}).square().mean(),
            list(model.parameters()),
        )
        for i in range(x.shape[0])
    ]
    wrapped = GradSampleModule(model)
    wrapped(x, t, **cond).square().mean().backward()
    for j, (name, p) in enumerate(model.named_parameters()):
        grad_sample = getattr(p, "grad_sample", None)
        assert grad_sample is not None, f"{name}: no per-sample gradient"
        assert grad_sample.shape == (x.shape[0], *p.shape), name
        for i in range(x.shape[0]):
            assert torch.allclose(grad_sample[i], alone[i][j], atol=1e-5, rtol=1e-3), f"{name}, sample {i}"
    wrapped._close()


def overfit_ratio(model: nn.Module, x1: Tensor, *, steps: int, lr: float = 3e-3, **cond: Any) -> float:
    """Initial over final loss after ``steps`` Adam steps on one fixed (x0, t, x1) batch."""
    x0, t = torch.randn_like(x1), torch.rand(x1.shape[0])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = flow_matching_loss(model, x1, x0=x0, t=t, **cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0] / min(losses[-10:])
