"""Faster Opacus internals for the CPU demo: same DP-SGD, less time per step.

Profiling one DP step per network (batch 8, one thread) put ~80 % of the DP overhead in Opacus' per-sample
convolution gradients (im2col: the input copied k² times, then one matmul per sample) and most of the rest in
per-parameter Python loops of `DPOptimizer` (``scale_grad`` even re-walks all parameters for each one).

- `conv_grad_sample` computes a convolution's per-sample weight gradients with ONE grouped
  ``convolution_backward`` (the batch folded into the channel groups), the same sums without the copies, or,
  for kernels of at most 3 taps, with one batched GEMM per tap on shifted views of the input.
- `FastGradSampleModule` is Opacus' hook-based `GradSampleModule` with that sampler for Conv1d/2d/3d, output
  tensor hooks instead of module backward hooks, and no summed weight or bias gradients (DP-SGD discards
  them). With the bias's too (oneDNN computed the weight gradient whenever the bias's was asked for) and the
  shifted sampler, the DP/plain step ratio fell from 1.3-1.7x to 1.1-1.4x on the demo networks
  (``benchmarks/federation.py --only dp``).
- `FastDPOptimizer` is `DPOptimizer` clipping with one matrix-vector product per parameter, drawing the
  step's noise in one call and scaling with one fused op.

Nothing here changes the mechanism: per-sample gradients, the clipping bound C, the noise std σ·C and the
1 / expected-batch-size scaling are Opacus' own, so the accountant's (σ, q, steps) still describe it exactly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import Tensor, nn
from torch.nn import functional as F

from echoflow.errors import EchoFlowError

Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d


def conv_grad_sample(layer: Conv, activations: list[Tensor], backprops: Tensor) -> dict[Tensor, Tensor]:
    """Per-sample gradients of a convolution's weight and bias, shaped ``(batch, *param.shape)``.

    Whichever sampler was fastest per layer of the demo networks (batch 8, one thread): `shifted_conv_grad_sample`
    for kernels of at most 3 taps (1x1 kernels and the (2+1)D networks' time kernels, now (3, 1) 2D ones in
    `TemporalConv`; stride 1, one group: ~1.5-2x faster than the grouped sampler on the time kernels when they were
    3D, on par or faster on 1x1 ones; oneDNN's grouped and summed weight gradients of 3D time kernels were both slow),
    `grouped_conv_grad_sample` where it beats Opacus' im2col sampler, Opacus' otherwise, and for string padding,
    non-zero padding modes and empty batches.
    """
    if len(activations[0]) == 0 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return compute_conv_grad_sample(layer, activations, backprops)
    x = activations[0].to(backprops.dtype)
    if layer.groups == 1 and set(layer.stride) == {1} and math.prod(layer.kernel_size) <= 3:
        return shifted_conv_grad_sample(layer, x, backprops)
    if not _grouped_is_faster(layer, backprops):
        return compute_conv_grad_sample(layer, activations, backprops)
    return grouped_conv_grad_sample(layer, x, backprops)


def _grouped_is_faster(layer: Conv, backprops: Tensor) -> bool:
    """Where the grouped sampler won, per layer of the demo networks (batch 8, one thread).

    Every 3D convolution (3-10x for the EF regressor's wide maps and the (1, 3, 3) kernels of the video flow;
    par for the time kernels when they were 3D). In 2D, k x k kernels between maps of >= 8 channels per group (thin
    layers and 1x1 kernels are faster as Opacus' im2col), on maps of >= 16 x 16 outputs (1.2-2.5x) or, on smaller maps,
    of <= 64 channels per group (the discriminator's 64 -> 128 channels on 8 x 8 are 4x faster as im2col).
    """
    if isinstance(layer, nn.Conv3d):
        return True
    channels = (layer.in_channels // layer.groups, layer.out_channels // layer.groups)
    large_map = backprops[0, 0].numel() >= 256
    return (isinstance(layer, nn.Conv2d) and min(layer.kernel_size) > 1 and min(channels) >= 8
            and (large_map or max(channels) <= 64))


def grouped_conv_grad_sample(layer: Conv, x: Tensor, backprops: Tensor) -> dict[Tensor, Tensor]:
    """Per-sample gradients from ONE grouped ``convolution_backward``, without Opacus' im2col copies.

    A convolution of ``n`` samples with ``g`` groups is one convolution of a single "sample" whose channels are
    the ``n`` samples' channels side by side, with ``n·g`` groups; its weight gradient, which the backward
    kernel computes directly, is the ``n`` per-sample weight gradients stacked.
    """
    n = len(x)
    grads: dict[Tensor, Tensor] = {}
    if layer.weight.requires_grad:
        stacked = layer.weight.new_empty((n * layer.weight.shape[0], *layer.weight.shape[1:]))  # only its shape is read
        _, weight_grad, _ = torch.ops.aten.convolution_backward(
            backprops.reshape(1, -1, *backprops.shape[2:]), x.reshape(1, -1, *x.shape[2:]), stacked, None,
            layer.stride, layer.padding, layer.dilation, False, [0] * len(layer.stride), n * layer.groups,
            [False, True, False],
        )
        grads[layer.weight] = weight_grad.view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.flatten(2).sum(2)
    return grads


def shifted_conv_grad_sample(layer: Conv, x: Tensor, backprops: Tensor) -> dict[Tensor, Tensor]:
    """Per-sample gradients of a stride-1, one-group convolution: one batched GEMM per kernel tap.

    On the zero-padded input's grid flattened to one axis, kernel tap ``j`` reads the input shifted by a fixed
    offset ``o_j``; with the output gradient laid on the same grid (zeros outside the output), the tap's
    per-sample weight gradient is ``backprops_grid[:, :, :L] @ x_grid[:, :, o_j:o_j + L]ᵀ`` (a strided view, no
    copy). A few long GEMMs: what a 1x1 or a temporal (3, 1, 1) kernel needs.
    """
    if isinstance(layer.padding, str) or layer.groups != 1 or set(layer.stride) != {1}:
        raise EchoFlowError("dp: the shifted sampler needs numeric padding, stride 1 and one group")
    n = len(x)
    grads: dict[Tensor, Tensor] = {}
    if layer.weight.requires_grad:
        padding = [side for pad in reversed(layer.padding) for side in (pad, pad)]
        padded = F.pad(x, padding) if any(padding) else x
        grid = padded.shape[2:]
        room = [side for out, size in zip(reversed(backprops.shape[2:]), reversed(grid), strict=True)
                for side in (0, size - out)]
        on_grid = (F.pad(backprops, room) if any(room) else backprops).flatten(2)
        flat = padded.flatten(2)
        steps = [math.prod(grid[i + 1:]) for i in range(len(grid))]
        offsets = [sum(t * d * step for t, d, step in zip(tap, layer.dilation, steps, strict=True))
                   for tap in itertools.product(*(range(k) for k in layer.kernel_size))]
        length = flat.shape[2] - max(offsets)
        taps = [torch.bmm(on_grid[:, :, :length], flat[:, :, o:o + length].transpose(1, 2)) for o in offsets]
        grads[layer.weight] = torch.stack(taps, dim=-1).view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.flatten(2).sum(2)
    return grads


def linear_grad_sample(layer: nn.Linear, activations: list[Tensor], backprops: Tensor) -> dict[Tensor, Tensor]:
    """Per-sample gradients of a linear layer: an outer product per sample (2D input) or one batched GEMM.

    Opacus' ``einsum("n...i,n...j->nij")`` took 3-5x longer on the demo networks' layers (one thread).
    """
    x = activations[0].to(backprops.dtype)
    grads: dict[Tensor, Tensor] = {}
    if x.dim() == 2:
        if layer.weight.requires_grad:
            grads[layer.weight] = backprops[:, :, None] * x[:, None, :]
        if layer.bias is not None and layer.bias.requires_grad:
            grads[layer.bias] = backprops
        return grads
    g, a = backprops.flatten(1, -2), x.flatten(1, -2)  # (n, tokens, out), (n, tokens, in)
    if layer.weight.requires_grad:
        grads[layer.weight] = torch.bmm(g.transpose(1, 2), a)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = g.sum(1)
    return grads


def group_norm_grad_sample(layer: nn.GroupNorm, activations: list[Tensor],
                           backprops: Tensor) -> dict[Tensor, Tensor]:
    """Per-sample gradients of GroupNorm's affine weight and bias: sums over positions, without einsum."""
    x = activations[0].to(backprops.dtype)
    n, c = backprops.shape[:2]
    grads: dict[Tensor, Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        normalised = F.group_norm(x, layer.num_groups, eps=layer.eps)
        grads[layer.weight] = (normalised * backprops).reshape(n, c, -1).sum(2)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.reshape(n, c, -1).sum(2)
    return grads


class FastGradSampleModule(GradSampleModule):
    """Opacus' hook-based `GradSampleModule` with `conv_grad_sample`, cheaper hooks and no summed weight grads.

    - Backprops come from a hook on each layer's output tensor, registered by the forward hook together with
      that forward's input, instead of a module full-backward hook (which wraps every layer's inputs and
      outputs in an extra autograd function on each forward and backward) and Opacus' per-module activation
      lists, counters and zero-filled staging copies. Opacus' grad samplers compute the per-sample gradients.
    - Autograd would also compute every convolution's and linear layer's summed weight and bias gradients,
      which DP-SGD discards (the optimiser uses the clipped per-sample gradients): weight and bias stop
      requiring a gradient for the duration of the layer's forward, so the backward computes only the input
      gradient. The bias matters as much as the weight: oneDNN's convolution backward computes the weight
      gradient whenever the bias gradient is asked for (the demo VAE's backward: 72 ms with the bias's
      gradient, 47 ms without; one thread). A layer whose input needs no gradient (the first) keeps both:
      without them the layer would have no backward at all.
    """

    GRAD_SAMPLERS: ClassVar[dict[type[nn.Module], Callable[..., dict[Tensor, Tensor]]]] = {
        **GradSampleModule.GRAD_SAMPLERS,
        nn.Conv1d: conv_grad_sample,
        nn.Conv2d: conv_grad_sample,
        nn.Conv3d: conv_grad_sample,
        nn.Linear: linear_grad_sample,
        nn.GroupNorm: group_norm_grad_sample,
    }

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        """Hook every layer with trainable parameters (handles kept where Opacus' ``remove_hooks`` finds them)."""
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        if not batch_first:
            raise EchoFlowError("dp: per-sample gradients need the batch dimension first")
        self.autograd_grad_sample_hooks: list[Any] = []
        self._module.autograd_grad_sample_hooks = self.autograd_grad_sample_hooks
        self._switched_off: dict[nn.Module, list[nn.Parameter]] = {}
        # each layer's own parameters and their size, listed once: ``module.parameters()`` walks a generator
        # (three calls per layer per step were 3 ms of a 64 ms image-flow step)
        self._own: dict[nn.Module, tuple[list[nn.Parameter], int]] = {}
        for module in self.iterate_submodules(self._module):
            own = list(module.parameters(recurse=False))
            self._own[module] = own, sum(p.numel() for p in own)
            if force_functorch or type(module) not in self.GRAD_SAMPLERS:
                prepare_layer(module, batch_first=True)
            self.autograd_grad_sample_hooks.append(module.register_forward_hook(self._after_forward, always_call=True))
            if isinstance(module, nn.Linear | Conv) and module.weight.requires_grad:
                self.autograd_grad_sample_hooks.append(module.register_forward_pre_hook(self._weight_grad_off))
        self.enable_hooks()

    def _weight_grad_off(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if (self.hooks_enabled and module.training and torch.is_grad_enabled() and module.weight.requires_grad
                and isinstance(x, Tensor) and x.requires_grad):
            switched = [p for p in self._own[module][0] if p.requires_grad]
            for p in switched:
                p.requires_grad_(False)
            self._switched_off[module] = switched

    def _after_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Restore weight and bias; hand this forward's input to a hook on its output (no per-module bookkeeping)."""
        for p in self._switched_off.pop(module, ()):
            p.requires_grad_(True)
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled()
                and any(p.requires_grad for p in self._own[module][0])):
            return
        if not (isinstance(output, Tensor) and output.requires_grad):
            raise EchoFlowError(f"dp: {type(module).__name__} output carries no gradient for per-sample gradients")
        activations = [a.detach() if isinstance(a, Tensor) else a for a in args]
        output.register_hook(partial(self._per_sample_grads, module, activations))

    def _per_sample_grads(self, module: nn.Module, activations: list[Any], backprops: Tensor) -> None:
        """Add the layer's per-sample gradients to ``p.grad_sample`` (a layer run twice in a step adds twice)."""
        if not self.hooks_enabled:
            return
        sampler = self.GRAD_SAMPLERS.get(type(module), ft_compute_per_sample_gradient)
        # the loss is a batch mean: each sample's own gradient is batch-size times its share of it; scale
        # whichever is smaller, the layer's output gradient or its per-sample gradients
        n = len(activations[0])
        scale = n if self.loss_reduction == "mean" else 1
        per_sample_size = n * self._own[module][1]
        scale_first = scale != 1 and backprops.numel() <= per_sample_size
        grads = sampler(module, activations, backprops * scale if scale_first else backprops)
        for p, grad in grads.items():
            grad = grad * scale if scale != 1 and not scale_first else grad
            p.grad_sample = grad if p.grad_sample is None else p.grad_sample + grad


class FastDPOptimizer(DPOptimizer):
    """`DPOptimizer` whose noise is one draw for all parameters and whose scaling is one fused division.

    Same distribution as Opacus' per-parameter draws (i.i.d. N(0, (σ·C)²) per coordinate); the secure-mode
    noise (robust to floating-point attacks) is left to Opacus.
    """

    def clip_and_accumulate(self) -> None:
        """Opacus' per-sample clipping (one factor per sample over all parameters), without its per-call overhead."""
        params = self.params
        samples = [self._get_flat_grad_sample(p) for p in params]
        if len(samples[0]) == 0:  # an empty Poisson batch
            super().clip_and_accumulate()
            return
        flat = [g.reshape(len(g), -1) for g in samples]
        norms = torch.stack([g.norm(2, dim=1) for g in flat], dim=1).norm(2, dim=1)
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for p, g in zip(params, flat, strict=True):
            _check_processed_flag(p.grad_sample)
            grad = (factor @ g).view(p.shape)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

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
