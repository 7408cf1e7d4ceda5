"""One autograd node for a frozen linear layer plus a sparse increment (SHiRA, sparse fine-tuning).

With the frozen ``W ∈ R^{O×I}`` (bias ``b``), the sorted flat indices ``idx`` of the mask
``M`` (row-major in ``O×I``: ``row = idx // I``, ``col = idx % I``) and the trained values
``v`` (scale ``s``):

    W' = W + s·S,   S.flat[idx] = v          (one copy of W plus a scatter)
    y  = x W'ᵀ + b

backward, given ``∂y`` (``N×O``):

    ∂x = ∂y W'                                 (W' rebuilt: the node saves W, not a copy)
    ∂v = s · (∂yᵀ x)[row, col]                 (a sampled product: only the masked entries)

The composed path (``F.linear(x, W + ΔW)`` with ``ΔW`` built by ``index_add``) lets
autograd form the dense ``∂W' = ∂yᵀ x`` (``N·O·I`` multiply-adds, as much as the forward
GEMM) and then gather ``|M|`` entries of it, and keeps a full copy ``W'`` alive for the
backward.  Here the weight gradient costs ``N·|M|`` (``torch.sparse.sampled_addmm`` on
the CSR pattern of ``M``) and no weight copy is saved.  ``tests/test_shira.py`` checks
values and gradients against the composed path.

Used for a plain frozen ``nn.Linear`` in fp32/fp64 outside autocast (see :func:`sparse_fusable`);
other layers, dtypes and devices keep the composed weight path.
"""

from __future__ import annotations

import warnings

import torch


def csr_pattern(indices: torch.Tensor, out_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(crow_indices, col_indices)`` (int64) of the mask with sorted flat ``indices`` in an ``O×I`` matrix."""
    flat = indices.long()
    rows, cols = flat // in_dim, flat % in_dim
    crow = torch.zeros(out_dim + 1, dtype=torch.long, device=indices.device)
    crow[1:] = torch.bincount(rows, minlength=out_dim).cumsum(0)
    return crow, cols


class _SparseDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, crow, cols, scale):
        x2 = x.reshape(-1, x.shape[-1])
        patched = weight.reshape(-1).index_add(0, indices, values.to(weight.dtype), alpha=scale).view_as(weight)
        out = torch.addmm(bias, x2, patched.T) if bias is not None else x2 @ patched.T
        ctx.save_for_backward(x2, weight, values, indices, crow, cols)
        ctx.scale = scale
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, values, indices, crow, cols = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            patched = weight.reshape(-1).index_add(0, indices, values.to(weight.dtype), alpha=ctx.scale)
            grad_x = (g2 @ patched.view_as(weight)).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            with warnings.catch_warnings():  # "sparse CSR support is in beta": the op used here is tested
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros_like(values, dtype=g2.dtype),
                                                  size=weight.shape, check_invariants=False)
            sampled = torch.sparse.sampled_addmm(pattern, g2.T, x2, beta=0.0)
            grad_values = (sampled.values() * ctx.scale).to(values.dtype)
        return grad_x, None, None, grad_values, None, None, None, None


def sparse_delta_linear(x, weight, bias, values, indices, crow, cols, scale: float) -> torch.Tensor:
    """``x (W + s·S)ᵀ + b`` as one autograd node (see the module docstring)."""
    return _SparseDeltaLinear.apply(x, weight, bias, values, indices.long(), crow, cols, float(scale))


def sparse_fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32/fp64 on the CPU, outside autocast (where ``sampled_addmm`` is exact and fast)."""
    return (
        x.dtype == weight.dtype
        and weight.dtype in (torch.float32, torch.float64)
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
    )
