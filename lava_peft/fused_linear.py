"""One autograd node for a frozen linear layer plus one low-rank adapter (LoRA / LAVA).

For a frozen ``W ∈ R^{O×I}`` (bias ``b``) and an adapter ``ΔW = s·U V`` with
``V ∈ R^{r×I}`` (down) and ``U ∈ R^{O×r}`` (up), both fp32, the layer computes

    h = x Vᵀ                       (N×r, the rank-r hidden state)
    y = b + h (sU)ᵀ + x Wᵀ         (one thin addmm, then the base GEMM with β = 1)

and its backward, given ``∂y``:

    ∂h = ∂y (sU)                   (N×r)
    ∂U = s · (hᵀ ∂y)ᵀ              (O×r, fp32)
    ∂V = ∂hᵀ x                     (r×I, fp32)
    ∂x = ∂h V + ∂y W               (the thin product first, then the base GEMM with β = 1)

Compared with composing the same maths from autograd ops (``lowrank_forward``, the
reference path), this

* accumulates both ``y`` and ``∂x`` inside the base GEMM (β = 1) instead of adding a
  separate ``N×O`` / ``N×I`` result afterwards (one pass over the activation less each way);
* is one autograd node instead of about eight (scale, transpose, copies, casts, two
  products, the add), which matters at small sizes on the CPU and for kernel launches
  on the GPU.

The factors are cast to the activation dtype inside the node (never the activations);
their gradients come back in fp32.  ``W`` and ``b`` receive no gradient, so the node is
only used for a frozen, unquantized, floating base weight, outside autocast, without
adapter dropout (:func:`fusable`); every other case takes the reference path.  Both
paths compute the same function; ``tests/test_fastpaths.py`` checks values and
gradients against each other.
"""

from __future__ import annotations

import torch
from torch import nn

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale):
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        down_c = down.to(dtype)
        # (s·U)ᵀ as a contiguous (r, O) matrix: ∂h = ∂y·(s·U) then reads a column-major
        # right operand, which CPU BLAS runs ~2x faster for r ≪ O than a row-major one.
        up_t = (up * scale).T.contiguous().to(dtype)
        hidden = x2 @ down_c.T
        # the result is allocated in x's leading shape and filled through a 2-D view, so the
        # node returns a base tensor (not a view) that later adapters may update in place
        out = x.new_empty(*x.shape[:-1], up_t.shape[1])
        out2 = out.view(-1, up_t.shape[1])
        if bias is not None:
            torch.addmm(bias, hidden, up_t, out=out2)
        else:
            torch.mm(hidden, up_t, out=out2)
        out2.addmm_(x2, weight.T)
        ctx.save_for_backward(x2, weight, hidden, down_c, up_t)
        ctx.scale = scale
        ctx.x_shape = x.shape
        ctx.down_dtype, ctx.up_dtype = down.dtype, up.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, hidden, down_c, up_t = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_hidden = g2 @ up_t.T
        grad_x = grad_down = grad_up = None
        if ctx.needs_input_grad[4]:
            grad_up = (hidden.T @ g2).to(ctx.up_dtype).T * ctx.scale
        if ctx.needs_input_grad[3]:
            grad_down = (grad_hidden.T @ x2).to(ctx.down_dtype)
        if ctx.needs_input_grad[0]:
            grad_x = (grad_hidden @ down_c).addmm_(g2, weight).view(ctx.x_shape)
        return grad_x, None, None, grad_down, grad_up, None


def lowrank_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                   up: torch.Tensor, scale: float) -> torch.Tensor:
    """``x Wᵀ + b + s·(x Vᵀ) Uᵀ`` as one autograd node (see the module docstring)."""
    return _LowRankLinear.apply(x, weight, bias, down, up, float(scale))


def frozen_linear_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(W in (O, I) layout, bias)`` of a plain, frozen, floating ``nn.Linear``; else ``None``.

    Subclasses (bitsandbytes ``Linear4bit``), tensor-subclass weights (torchao), layers
    with forward hooks and trainable base weights or biases are excluded: they keep the
    reference path.
    """
    if type(layer) is not nn.Linear or layer._forward_hooks or layer._forward_pre_hooks:
        return None  # hooks (e.g. accelerate's offloading) must see the base layer's own forward
    weight, bias = layer.weight, layer.bias
    if type(weight) is not nn.Parameter or weight.dtype not in _FLOAT_DTYPES or weight.requires_grad:
        return None
    if bias is not None and (type(bias) is not nn.Parameter or bias.requires_grad or bias.dtype != weight.dtype):
        return None
    return weight, bias


def fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused node applies to this input (same dtype and device, no autocast)."""
    return (
        x.dtype == weight.dtype
        and x.device == weight.device
        and x.dim() >= 1
        and not torch.is_autocast_enabled(x.device.type)
    )
