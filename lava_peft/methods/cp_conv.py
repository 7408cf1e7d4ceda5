"""CP-separable execution of a LAVA convolution increment, and the per-layer path choice.

A LAVA conv increment is a CP sum on the unflattened kernel ``(O, I/g, K1, …, KN)``::

    ΔW[o, i, k1, …, kN] = s · Σ_j U[o, j] · V[j, i] · P1[j, k1] ··· PN[j, kN]

Because the conv is linear in its kernel, ``conv(x, ΔW)`` factorises exactly into

1. ``z = conv1x1(x; V)``        — ``I → r`` channels (per group: ``I/g → r``), stride 1, no padding;
2. ``w = dwconv(z; ⊗_m P_m)``   — depthwise over the ``r·g`` channels with the rank-1 spatial
   kernel ``Kj[k1..kN] = Π_m P_m[j, k_m]``, carrying the layer's stride, dilation and
   padding (as one depthwise conv, or one 1-D depthwise conv per spatial mode when the
   kernel is large: ``ΠK > 2·ΣK``);
3. ``y = conv1x1(w; s·U)``      — ``r → O`` (per group), fused with the addition to the base output.

Why it is exact for any stride / dilation / padding: a 1×1 conv acts pixel by pixel, so
it commutes with any padding that only moves or zeroes pixels (zeros, reflect,
replicate, circular); the remaining sum over kernel positions and components is exactly
the depthwise conv of step 2.  Groups: component ``j`` of group ``γ`` reads only the
input channels of ``γ`` and writes only its output channels, which is a grouped 1×1 conv
with ``V`` (and the spatial kernel) repeated per group.

Cost per training step (forward + backward) compared with the *weight path* (run one
conv with ``W0 + ΔW``), which adds one full weight-gradient conv
(``N_out·O·I/g·ΠK`` MACs) but no activation traffic of its own beyond re-reading ``x``
and ``∂y``:  the chain costs ``≈ 3·r·(N_in·I + N_out·g·ΠK + N_out·O)`` MACs, and moves
``≈ 5·N_in·I + 4·N_out·O`` activation elements (read ``x`` twice, write and accumulate
``∂x``, read-modify-write ``y``, read ``∂y`` twice).  :func:`choose_conv_path` turns
both into time with a fixed per-device profile (MAC rate, memory bandwidth) and picks
the cheaper: deterministic for given shapes, dtype and device type.

LoRA's flattened kernel (``ΔW = s·B A``, ``A (r, I/g·ΠK)``, ``B (O, r)``) has the same kind
of chain, the one HF PEFT runs (:func:`lowrank_conv_factored`):

1. ``z = conv(x; A as (r, I/g, K1..KN))`` — ``I/g·ΠK → r`` per group, with the layer's
   stride, dilation, padding and padding mode (``A`` repeated per group: ``r·g`` channels);
2. ``y = conv1x1(z; s·B)`` — ``r → O`` (grouped: output channel ``o`` of group ``γ`` reads
   the ``r`` channels of ``γ``), fused with the addition to the base output.

Exact for any groups: ``ΔW[o, i, k] = s Σ_j B[o, j] A[j, i, k]`` only ever pairs an output
channel with the input channels of its own group, which is what the grouped convs do.
Its cost (the ``"factored"`` entry of :func:`conv_path_costs`): ``≈ 3·r·N_out·(I·ΠK + O)``
MACs and ``≈ 5·N_in·I + 4·N_out·O + 6·g·r·N_out`` activation elements.
:func:`choose_conv_path` takes the chain to compare with the weight path (``chain=``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# (multiply-accumulates per second, bytes per second) — rough sustained figures; only
# their ratio and the shapes decide the path.  CUDA: H100-class bf16; CPU: 2-core AVX-512.
DEVICE_PROFILES: dict[str, tuple[float, float]] = {
    "cuda": (300e12, 2.5e12),
    "cpu": (8e10, 2e10),
}


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def conv_output_spatial(in_spatial, kernel, stride, padding, dilation) -> tuple[int, ...]:
    """Output spatial size of a conv (``padding`` ints, or ``'same'``/``'valid'``)."""
    n = len(kernel)
    if padding == "same":
        return tuple(in_spatial)
    pad = (0,) * n if padding == "valid" else _tuple(padding, n)
    stride, dilation = _tuple(stride, n), _tuple(dilation, n)
    return tuple(
        (h + 2 * p - d * (k - 1) - 1) // s + 1 for h, k, s, p, d in zip(in_spatial, kernel, stride, pad, dilation)
    )


def conv_path_costs(batch: int, in_spatial, out_spatial, in_channels: int, out_channels: int, kernel, groups: int,
                    r: int, elem_bytes: int, device_type: str) -> dict[str, float]:
    """Estimated extra seconds per training step of each path (see the module docstring)."""
    macs_rate, bw = DEVICE_PROFILES.get(device_type, DEVICE_PROFILES["cuda"])
    n_in = batch * math.prod(in_spatial)
    n_out = batch * math.prod(out_spatial)
    kp = math.prod(kernel)
    k_dw = min(kp, sum(kernel)) if kp > 2 * sum(kernel) else kp
    weight_macs = n_out * out_channels * (in_channels // groups) * kp
    weight_bytes = elem_bytes * (n_in * in_channels + n_out * out_channels)
    sep_macs = 3 * r * (n_in * in_channels + n_out * groups * k_dw + n_out * out_channels)
    sep_bytes = elem_bytes * (5 * n_in * in_channels + 4 * n_out * out_channels + 6 * groups * r * (n_in + n_out))
    fac_macs = 3 * r * n_out * (in_channels * kp + out_channels)
    fac_bytes = elem_bytes * (5 * n_in * in_channels + 4 * n_out * out_channels + 6 * groups * r * n_out)
    return {
        "weight": weight_macs / macs_rate + weight_bytes / bw,
        "separable": sep_macs / macs_rate + sep_bytes / bw,
        "factored": fac_macs / macs_rate + fac_bytes / bw,
    }


def choose_conv_path(layer: torch.nn.Module, x_shape, r: int, dtype: torch.dtype, device_type: str,
                     chain: str = "separable") -> str:
    """``"weight"`` or ``chain`` for this conv layer and input shape (pure function of shapes).

    ``chain`` is the weight path's alternative: ``"separable"`` (LAVA's CP chain) or ``"factored"``
    (LoRA's two convs)."""
    weight = layer.weight
    n = weight.dim() - 2
    kernel = tuple(weight.shape[2:])
    in_spatial = tuple(x_shape[-n:])
    batch = math.prod(x_shape[:-n - 1]) if len(x_shape) > n + 1 else 1
    out_spatial = conv_output_spatial(in_spatial, kernel, layer.stride, layer.padding, layer.dilation)
    elem = torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4
    costs = conv_path_costs(batch, in_spatial, out_spatial, weight.shape[1] * layer.groups, weight.shape[0],
                            kernel, layer.groups, r, elem, device_type)
    return chain if costs[chain] < costs["weight"] else "weight"


def _spatial_kernel(P: list[torch.Tensor]) -> torch.Tensor:
    """``(r, K1, …, KN)`` with ``K[j, k1..kN] = Π_m P_m[j, k_m]``."""
    kern = P[0]
    for p in P[1:]:
        kern = kern.unsqueeze(-1) * p.view(p.shape[0], *([1] * (kern.dim() - 1)), p.shape[1])
    return kern


def cp_conv_separable(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, P: list[torch.Tensor], scale: float,
                      layer: torch.nn.Module, dtype: torch.dtype, base_out: torch.Tensor | None = None) -> torch.Tensor:
    """``base_out + conv(x, ΔW)`` (or the contribution alone) via the separable chain, ΔW never built.

    ``U (O, r)``, ``V (r, I/g)``, ``P[m] (r, K_m)``; ``layer`` supplies stride, padding,
    dilation, groups and padding mode.  The factors are cast to ``dtype`` (the base
    output's dtype); the activations are not cast (autocast casts ``x`` as it does for
    the base conv).  With ``base_out`` the last ``r → O`` step is fused with the addition
    into one GEMM with β = 1 (``addmm``/``baddbmm``) when ``groups == 1``; a channels-last
    base output gives a channels-last result.
    """
    n = len(P)
    conv = _CONV_FN[n]
    g = layer.groups
    r = U.shape[1]
    ones = (1,) * n
    kernel = tuple(p.shape[1] for p in P)
    zeros_mode = layer.padding_mode == "zeros"

    v_w = V.to(dtype).reshape(r, V.shape[1], *ones)
    if g > 1:
        v_w = v_w.repeat(g, *([1] * (n + 1)))
    if all(k == 1 for k in kernel) and zeros_mode:
        # 1×1 kernel: stride/padding act on z directly; Π_m P_m[j, 0] is a per-component scale
        w = conv(x, v_w, None, layer.stride, layer.padding, 1, g)
        comp_scale = _spatial_kernel(P).reshape(r)
    else:
        z = conv(x, v_w, None, 1, 0, 1, g)
        pad = layer.padding
        if not zeros_mode:
            z = F.pad(z, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
            pad = 0
        kp, ks = math.prod(kernel), sum(kernel)
        if kp > 2 * ks:  # large kernel: one 1-D depthwise conv per spatial mode
            w = z
            stride, dil = _tuple(layer.stride, n), _tuple(layer.dilation, n)
            pads = pad if isinstance(pad, str) else _tuple(pad, n)
            for m, p in enumerate(P):
                shape = [1] * n
                shape[m] = p.shape[1]
                k_m = p.to(dtype).reshape(r, 1, *shape)
                if g > 1:
                    k_m = k_m.repeat(g, *([1] * (n + 1)))
                st = tuple(stride[a] if a == m else 1 for a in range(n))
                dl = tuple(dil[a] if a == m else 1 for a in range(n))
                pd = pads if isinstance(pads, str) else tuple(pads[a] if a == m else 0 for a in range(n))
                w = conv(w, k_m, None, st, pd, dl, r * g)
        else:
            kern = _spatial_kernel([p.to(dtype) for p in P]).reshape(r, 1, *kernel)
            if g > 1:
                kern = kern.repeat(g, *([1] * (n + 1)))
            w = conv(z, kern, None, layer.stride, pad, layer.dilation, r * g)
        comp_scale = None

    u = U * scale if comp_scale is None else U * (comp_scale * scale)
    return _pointwise_up(w, u.to(dtype), base_out, g)


def _pointwise_up(w: torch.Tensor, u: torch.Tensor, base_out: torch.Tensor | None, g: int) -> torch.Tensor:
    """``base_out + conv1x1(w; u)`` (grouped by ``g``; the contribution alone without ``base_out``).

    ``w (B, r·g, *S)``, ``u (O, r)`` already scaled and cast.  With ``base_out`` and ``g == 1`` it
    is one GEMM with β = 1 (``addmm``/``baddbmm``); a channels-last base output gives a
    channels-last result.
    """
    out_ch, r = u.shape
    n = w.dim() - 2
    if base_out is not None and g == 1 and base_out.dtype == w.dtype:
        # last step as a GEMM with β = 1 on a 2-D/3-D view of the base output (out of place:
        # in place through a view would cost a CopySlices clone in the backward)
        if base_out.dim() == 4 and base_out.is_contiguous(memory_format=torch.channels_last) \
                and w.is_contiguous(memory_format=torch.channels_last) and not base_out.is_contiguous():
            b, _, hh, ww = base_out.shape
            y = torch.addmm(base_out.permute(0, 2, 3, 1).reshape(-1, out_ch), w.permute(0, 2, 3, 1).reshape(-1, r),
                            u.T)
            return y.view(b, hh, ww, out_ch).permute(0, 3, 1, 2)
        if base_out.is_contiguous() and w.is_contiguous():
            b = base_out.shape[0]
            y = torch.baddbmm(base_out.view(b, out_ch, -1), u.unsqueeze(0).expand(b, out_ch, r), w.view(b, r, -1))
            return y.view(base_out.shape)
    y = _CONV_FN[n](w, u.reshape(out_ch, r, *((1,) * n)), None, 1, 0, 1, g)
    if base_out is None:
        return y
    return base_out + y.to(base_out.dtype)


def lowrank_conv_factored(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float,
                          layer: torch.nn.Module, dtype: torch.dtype,
                          base_out: torch.Tensor | None = None) -> torch.Tensor:
    """``base_out + conv(x, ΔW)`` (or the contribution alone) for ``ΔW = s·up·down`` on a flattened
    kernel, as two convs (see the module docstring); ``ΔW`` is never built.

    ``up (O, r)``, ``down (r, I/g·ΠK)``; ``layer`` supplies kernel size, stride, padding,
    dilation, groups and padding mode.  Factors are cast to ``dtype``; activations are not.
    """
    weight = layer.weight
    n = weight.dim() - 2
    g = layer.groups
    r = down.shape[0]
    kernel_a = down.to(dtype).reshape(r, *weight.shape[1:])
    if g > 1:
        kernel_a = kernel_a.repeat(g, *([1] * (n + 1)))
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        pad = 0
    else:
        pad = layer.padding
    z = _CONV_FN[n](x, kernel_a, None, layer.stride, pad, layer.dilation, g)
    return _pointwise_up(z, (up * scale).to(dtype), base_out, g)
