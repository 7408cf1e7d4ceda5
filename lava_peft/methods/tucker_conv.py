"""Tucker-2 convolution increments: numerics, the three-conv chain and its path choice.

A Tucker-2 increment on a conv kernel in the canonical layout ``(O, I/g, K1, …, KN)`` keeps
the spatial modes whole and factors only the two channel modes::

    ΔW[o, i, k] = s · Σ_{a<r_o} Σ_{b<r_i} U[o, a] · C[a, b, k] · V[b, i]

    U ∈ R^{O×r_o},  C ∈ R^{r_o×r_i×K1×…×KN} (the core, in rank space),  V ∈ R^{r_i×I/g}

with mode ranks ``r_o = min(r, O)`` and ``r_i = min(r, I/g)`` (a mode rank cannot exceed its
dimension, so a depthwise conv, ``I/g = 1``, gets ``r_i = 1`` and its increment is exactly
LoRA's flattened ``O × ΠK`` form of rank ``r_o``).  Parameters per layer::

    r_o·O + r_i·I/g + r_o·r_i·ΠK        (CP: r·(O + I/g + ΣK); flattened LoRA: r·(O + I/g·ΠK))

Because a conv is linear in its kernel, ``conv(x, ΔW)`` is exactly the chain (this is the
LoCon/LyCORIS "use_tucker" layout, written here from the formula):

1. ``z = conv1x1(x; V)``             ``I → r_i`` per group, stride 1, no padding;
2. ``w = conv(z; C)``                ``r_i → r_o`` per group, the layer's k×k kernel, stride,
                                     padding (mode), dilation — a *dense* conv in rank space;
3. ``y = conv1x1(w; s·U)``           ``r_o → O`` per group.

It is exact for every padding mode for the same reason as the CP chain
(:mod:`lava_peft.methods.cp_conv`): a bias-free 1×1 conv commutes with padding.  Groups:
the factors are shared by every group (as in the canonical layout, where ``ΔW`` is one
``(O, I/g, K)`` tensor), so ``V`` and ``C`` are repeated per group.

Cost per training step (forward + backward ≈ 3× the forward MACs) of the chain::

    3 · (N_in·I·r_i + N_out·g·r_o·r_i·ΠK + N_out·O·r_o)

against the weight path (one conv with ``W0 + ΔW``, whose extra cost is one weight-gradient
conv ``N_out·O·I/g·ΠK``); :func:`choose_tucker_path` compares the two with the same device
profile as the CP chain.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import LayerSpec
from .factors import tucker_block_diag, tucker_flat_down  # noqa: F401  (re-exported)
from .cp_conv import DEVICE_PROFILES, conv_output_spatial

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def tucker_mode_ranks(spec: LayerSpec, r: int) -> tuple[int, int]:
    """``(r_o, r_i) = (min(r, O), min(r, I/g))``."""
    return min(r, spec.out_dim), min(r, spec.in_dim)


def tucker_max_rank(spec: LayerSpec) -> int:
    """The rank beyond which neither mode rank grows: ``max(O, I/g)``."""
    return max(spec.out_dim, spec.in_dim)


def tucker_params(spec: LayerSpec, r: int) -> int:
    """Trainable parameters of a Tucker-2 adapter of rank ``r`` on a conv layer."""
    r_o, r_i = tucker_mode_ranks(spec, r)
    return r_o * spec.out_dim + r_i * spec.in_dim + r_o * r_i * math.prod(spec.kernel_size)


def tucker_core_init(r_o: int, r_i: int, kernel, generator: torch.Generator | None = None) -> torch.Tensor:
    """The core at init: ``N(0, 1/(r_i·ΠK))``, so each output component's slice ``C[a]`` has unit
    expected norm, like a CP component's spatial kernel ``P1[j] ⊗ P2[j]`` with ``P ~ N(0, 1/K)``."""
    return torch.randn(r_o, r_i, *kernel, generator=generator) / math.sqrt(r_i * math.prod(kernel))


def tucker_delta(U: torch.Tensor, core: torch.Tensor, V: torch.Tensor, scale: float) -> torch.Tensor:
    """``ΔW = s · core ×₁ U ×₂ Vᵀ`` in the canonical layout ``(O, I/g, K1, …, KN)`` (two GEMMs)."""
    return ((U * scale) @ tucker_flat_down(core, V)).view(U.shape[0], V.shape[1], *core.shape[2:])


def tucker_path_costs(batch: int, in_spatial, out_spatial, in_channels: int, out_channels: int, kernel, groups: int,
                      r_o: int, r_i: int, elem_bytes: int, device_type: str) -> dict[str, float]:
    """Estimated extra seconds per training step of the weight path and of the three-conv chain."""
    macs_rate, bw = DEVICE_PROFILES.get(device_type, DEVICE_PROFILES["cuda"])
    n_in, n_out = batch * math.prod(in_spatial), batch * math.prod(out_spatial)
    kp = math.prod(kernel)
    weight_macs = n_out * out_channels * (in_channels // groups) * kp
    weight_bytes = elem_bytes * (n_in * in_channels + n_out * out_channels)
    chain_macs = 3 * (n_in * in_channels * r_i + n_out * groups * r_o * r_i * kp + n_out * out_channels * r_o)
    chain_bytes = elem_bytes * (5 * n_in * in_channels + 4 * n_out * out_channels
                                + 6 * groups * (r_i * n_in + r_o * n_out))
    return {"weight": weight_macs / macs_rate + weight_bytes / bw, "chain": chain_macs / macs_rate + chain_bytes / bw}


def choose_tucker_path(layer: torch.nn.Module, x_shape, r_o: int, r_i: int, dtype: torch.dtype,
                       device_type: str) -> str:
    """``"weight"`` or ``"separable"`` (the chain) for this conv and input shape (pure function of shapes)."""
    weight = layer.weight
    n = weight.dim() - 2
    kernel = tuple(weight.shape[2:])
    in_spatial = tuple(x_shape[-n:])
    batch = math.prod(x_shape[:-n - 1]) if len(x_shape) > n + 1 else 1
    out_spatial = conv_output_spatial(in_spatial, kernel, layer.stride, layer.padding, layer.dilation)
    elem = torch.empty((), dtype=dtype).element_size()
    costs = tucker_path_costs(batch, in_spatial, out_spatial, weight.shape[1] * layer.groups, weight.shape[0], kernel,
                              layer.groups, r_o, r_i, elem, device_type)
    return "separable" if costs["chain"] < costs["weight"] else "weight"


def tucker_conv_chain(x: torch.Tensor, U: torch.Tensor, core: torch.Tensor, V: torch.Tensor, scale: float,
                      layer: torch.nn.Module, dtype: torch.dtype, base_out: torch.Tensor | None = None) -> torch.Tensor:
    """``base_out + conv(x, ΔW)`` (or the contribution alone) by the three-conv chain, ΔW never built.

    ``U (O, r_o)``, ``core (r_o, r_i, K…)``, ``V (r_i, I/g)``; ``layer`` supplies stride, padding
    (mode), dilation and groups.  The factors are cast to ``dtype``; activations are not.
    """
    n = core.dim() - 2
    conv = _CONV_FN[n]
    g = layer.groups
    r_o, r_i = core.shape[:2]
    ones = (1,) * n
    rep = (g,) + (1,) * (n + 1)
    down = V.to(dtype).reshape(r_i, V.shape[1], *ones)
    mid = core.to(dtype)
    if g > 1:
        down, mid = down.repeat(*rep), mid.repeat(*rep)
    z = conv(x, down, None, 1, 0, 1, g)
    pad = layer.padding
    if layer.padding_mode != "zeros":
        z = F.pad(z, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        pad = 0
    w = conv(z, mid, None, layer.stride, pad, layer.dilation, g)
    up = (U * scale).to(dtype)
    out_ch = U.shape[0]
    if base_out is not None and g == 1 and base_out.dtype == w.dtype and base_out.is_contiguous() \
            and w.is_contiguous():
        b = base_out.shape[0]  # last 1×1 step fused with the addition: one batched GEMM with β = 1
        y = torch.baddbmm(base_out.view(b, out_ch, -1), up.unsqueeze(0).expand(b, out_ch, r_o), w.view(b, r_o, -1))
        return y.view(base_out.shape)
    y = conv(w, up.reshape(out_ch, r_o, *ones), None, 1, 0, 1, g)
    return y if base_out is None else base_out + y.to(base_out.dtype)


# ------------------------------------------------------------------ exact re-factorings
def tucker_from_cp(up: torch.Tensor, modes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A CP sum ``Σ_j up_j ⊗ V_j ⊗ P1_j ⊗ …`` as Tucker-2 ``(U, core, V)`` with a superdiagonal core."""
    V, spatial = modes[0], modes[1:]
    R = up.shape[1]
    kern = spatial[0]
    for p in spatial[1:]:
        kern = kern.unsqueeze(-1) * p.view(R, *([1] * (kern.dim() - 1)), p.shape[1])
    core = torch.zeros(R, R, *kern.shape[1:], dtype=kern.dtype)
    idx = torch.arange(R)
    core[idx, idx] = kern
    return up, core, V


def tucker_compress(U: torch.Tensor, core: torch.Tensor, V: torch.Tensor):
    """The same tensor with mode ranks ``≤ (O, I)``: ``U = Q_o R_o``, ``Vᵀ = Q_i R_i``, core ``×₁ R_o ×₂ R_i``.

    Exact (QR in float64).  Only the modes whose rank exceeds their dimension are compressed.
    """
    U64, C64, V64 = U.double(), core.double(), V.double()
    if U64.shape[1] > U64.shape[0]:
        q, r = torch.linalg.qr(U64)
        U64, C64 = q, torch.einsum("ab,b...->a...", r, C64)
    if V64.shape[0] > V64.shape[1]:
        q, r = torch.linalg.qr(V64.T)
        V64, C64 = q.T, torch.einsum("cb,ab...->ac...", r, C64)
    return U64.to(U.dtype), C64.to(core.dtype), V64.to(V.dtype)


def tucker_hosvd(target: torch.Tensor, r_o: int, r_i: int):
    """Truncated HOSVD of a kernel ``(O, I, K…)`` at mode ranks ``(r_o, r_i)``: ``U``, ``V`` the leading
    singular vectors of the mode-1 / mode-2 unfoldings, ``core = T ×₁ Uᵀ ×₂ V``.  Exact when the target
    has multilinear rank ``≤ (r_o, r_i)``; otherwise a quasi-optimal fit (error ≤ √2 × the best)."""
    t = target.double()
    O, I = t.shape[:2]
    u = torch.linalg.svd(t.reshape(O, -1), full_matrices=False)[0][:, :r_o]
    v = torch.linalg.svd(t.transpose(0, 1).reshape(I, -1), full_matrices=False)[0][:, :r_i]
    core = torch.einsum("oa,oi...,ib->ab...", u, t, v)
    return u.float(), core.float(), v.T.contiguous().float()
