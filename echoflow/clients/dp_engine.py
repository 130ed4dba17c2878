"""Faster Opacus internals for the CPU demo: same DP-SGD, less time per step.

Profiling one DP step per network (batch 8, one thread) put ~80 % of the DP overhead in Opacus' per-sample
convolution gradients (im2col: the input copied k² times, then one matmul per sample) and most of the rest in
per-parameter Python loops of `DPOptimizer` (``scale_grad`` even re-walks all parameters for each one).

- `conv_grad_sample` computes a convolution's per-sample weight gradients with ONE grouped
  ``convolution_backward`` (the batch folded into the channel groups), the same sums without the copies.
- `FastGradSampleModule` is Opacus' hook-based `GradSampleModule` with that sampler for Conv1d/2d/3d.
- `FastDPOptimizer` is `DPOptimizer` drawing the step's noise in one call and scaling with one fused op.

Nothing here changes the mechanism: per-sample gradients, the clipping bound C, the noise std σ·C and the
1 / expected-batch-size scaling are Opacus' own, so the accountant's (σ, q, steps) still describe it exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import Tensor, nn

Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d


def conv_grad_sample(layer: Conv, activations: list[Tensor], backprops: Tensor) -> dict[Tensor, Tensor]:
    """Per-sample gradients of a convolution's weight and bias, shaped ``(batch, *param.shape)``.

    A convolution of ``n`` samples with ``g`` groups is one convolution of a single "sample" whose channels are
    the ``n`` samples' channels side by side, with ``n·g`` groups; its weight gradient, which the backward
    kernel computes directly, is the ``n`` per-sample weight gradients stacked. String padding, non-zero
    padding modes and empty batches are left to Opacus' own sampler.
    """
    x = activations[0].to(backprops.dtype)
    n = len(x)
    if n == 0 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return compute_conv_grad_sample(layer, activations, backprops)
    grads: dict[Tensor, Tensor] = {}
    if layer.weight.requires_grad:
        stacked = layer.weight.detach().repeat(n, *([1] * (layer.weight.dim() - 1)))  # only its shape is read
        _, weight_grad, _ = torch.ops.aten.convolution_backward(
            backprops.reshape(1, -1, *backprops.shape[2:]), x.reshape(1, -1, *x.shape[2:]), stacked, None,
            layer.stride, layer.padding, layer.dilation, False, [0] * len(layer.stride), n * layer.groups,
            [False, True, False],
        )
        grads[layer.weight] = weight_grad.view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.flatten(2).sum(2)
    return grads


class FastGradSampleModule(GradSampleModule):
    """Opacus' `GradSampleModule` (hooks mode) with `conv_grad_sample` and no summed weight gradients.

    Autograd would also compute every convolution's and linear layer's summed weight gradient, which DP-SGD
    discards (the optimiser uses the clipped per-sample gradients): the layer's weight stops requiring a
    gradient for the duration of its forward, so the backward computes only the input gradient while Opacus'
    hook still computes the per-sample ones. A layer whose input needs no gradient (the first) keeps its
    weight gradient: without it nothing would run the layer's backward.
    """

    GRAD_SAMPLERS: ClassVar[dict[type[nn.Module], Callable[..., dict[Tensor, Tensor]]]] = {
        **GradSampleModule.GRAD_SAMPLERS,
        nn.Conv1d: conv_grad_sample,
        nn.Conv2d: conv_grad_sample,
        nn.Conv3d: conv_grad_sample,
    }

    def add_hooks(self, **kwargs: Any) -> None:
        """Opacus' hooks, then the weight switch around each conv / linear forward (removed with them)."""
        super().add_hooks(**kwargs)
        self._switched_off: set[nn.Module] = set()
        for module in self.iterate_submodules(self._module):
            if isinstance(module, nn.Linear | Conv) and module.weight.requires_grad:
                self.autograd_grad_sample_hooks += [
                    module.register_forward_pre_hook(self._weight_grad_off),
                    # prepended: Opacus' activation hook must see the weight trainable again
                    module.register_forward_hook(self._weight_grad_on, prepend=True, always_call=True),
                ]

    def _weight_grad_off(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        weight = module.weight
        if (self.hooks_enabled and module.training and torch.is_grad_enabled() and weight.requires_grad
                and isinstance(x, Tensor) and x.requires_grad):
            weight.requires_grad_(False)
            self._switched_off.add(module)

    def _weight_grad_on(self, module: nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
        if module in self._switched_off:
            self._switched_off.discard(module)
            module.weight.requires_grad_(True)


class FastDPOptimizer(DPOptimizer):
    """`DPOptimizer` whose noise is one draw for all parameters and whose scaling is one fused division.

    Same distribution as Opacus' per-parameter draws (i.i.d. N(0, (σ·C)²) per coordinate); the secure-mode
    noise (robust to floating-point attacks) is left to Opacus.
    """

    def add_noise(self) -> None:
        """``p.grad = p.summed_grad + N(0, (σ·C)² I)`` for every parameter."""
        if self.secure_mode:
            super().add_noise()
            return
        params = self.params
        summed = [p.summed_grad for p in params]
        for s in summed:
            _check_processed_flag(s)
        std = self.noise_multiplier * self.max_grad_norm
        noise = torch.normal(0.0, std, (sum(s.numel() for s in summed),), generator=self.generator,
                             device=summed[0].device, dtype=summed[0].dtype)
        views = [chunk.view_as(s) for chunk, s in zip(noise.split([s.numel() for s in summed]), summed, strict=True)]
        for p, grad in zip(params, torch._foreach_add(summed, views), strict=True):
            p.grad = grad.view_as(p)
        for s in summed:
            _mark_as_processed(s)

    def scale_grad(self) -> None:
        """Divide every ``p.grad`` by expected batch size × accumulated iterations (``loss_reduction="mean"``)."""
        if self.loss_reduction == "mean":
            grads = [p.grad for p in self.params if p.grad is not None]
            torch._foreach_div_(grads, self.expected_batch_size * self.accumulated_iterations)
