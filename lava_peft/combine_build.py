"""Per-layer results of :func:`lava_peft.combine.add_weighted_adapter`: what each combination type builds.

Every builder returns ``{path: ("factors", Factors) | ("dense", tensor)}`` for one candidate
result method, or ``(None, reason)`` when that method cannot hold the result (the caller
then tries the next candidate).  Nothing here touches the model; the maths of each type is
in :mod:`lava_peft.combine`'s docstring and ``docs/many-adapters.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .combine_math import combine_dense, cp_als, peft_svd, truncated_svd, truncated_svd_of_product
from .errors import LavaConfigError
from .methods.base import LayerSpec
from .methods.factors import FactorCodec, Factors, _CODECS, to_native


@dataclass
class LayerInput:
    """One adapted layer: its path, spec, layer ops and the input adapters on it (``None`` where absent)."""

    path: str
    spec: LayerSpec
    ops: object
    adapters: list


def present(layer: LayerInput, weights, codecs=None):
    """``(adapter, weight, codec)`` of the inputs that adapt this layer, in the given order."""
    codecs = codecs or [None] * len(weights)
    return [(a, w, c) for a, w, c in zip(layer.adapters, weights, codecs) if a is not None]


# ------------------------------------------------------------------------------- dense targets
def dense_target(layer: LayerInput, weights, rule: str, density: float, gen, majority_sign_method: str) -> torch.Tensor:
    """``rule`` applied to the fp32 ``ΔW_a`` of the adapters present on the layer (canonical layout).

    The tensors are combined in the base layer's own layout (``Conv1D`` / ``Embedding`` store
    ``ΔWᵀ``), which is the layout PEFT's ``get_delta_weight`` returns, so DARE draws its mask
    entries in PEFT's order.  Absent adapters draw nothing (PEFT skips them; for the other
    rules a zero task tensor changes nothing).
    """
    parts = present(layer, weights)
    taus = [layer.ops.to_base_layout(_delta(a)) for a, _, _ in parts]
    combined = combine_dense(taus, [w for _, w, _ in parts], rule, density, gen, majority_sign_method)
    return layer.ops.to_base_layout(combined).contiguous()  # to_base_layout is its own inverse (a transpose or id)


def _delta(adapter) -> torch.Tensor:
    try:
        with torch.no_grad():
            return adapter.delta_weight().detach().float().cpu()
    except NotImplementedError:
        raise LavaConfigError(
            f"an input adapter ({type(adapter).__name__}) has no weight increment (a side-branch method) and "
            "cannot be combined; combine weight-delta adapters only"
        ) from None


# ------------------------------------------------------------------------------- exact / cat
def read_weighted(layer: LayerInput, weights, codecs, weight_on_down: bool = False) -> list[Factors]:
    """Each present adapter's factors times its weight: on ``up`` (scale folded in, ``exact_linear``)
    or, PEFT's ``cat``, ``w·s`` on the first down mode (``A``/``V``) with ``up`` the raw ``B``/``U``."""
    parts = []
    for a, w, codec in present(layer, weights, codecs):
        with torch.no_grad():
            f = codec.read(a, scaled=not weight_on_down)
        modes = [m.detach().float().cpu() for m in f.modes]
        up = f.up.detach().float().cpu()
        if weight_on_down:
            modes[0] = modes[0] * (w * a.scale)
        else:
            up = up * w
        parts.append(Factors(up, modes))
    return parts


def weighted_sum(layer: LayerInput, weights, codecs) -> torch.Tensor:
    """``Σ w_a ΔW_a`` on the layer: from the factors when every present input has them, else from ``ΔW_a``."""
    if any(c is None for _, _, c in present(layer, weights, codecs)):
        return dense_target(layer, weights, "linear", 1.0, None, "total")
    return Factors.cat(read_weighted(layer, weights, codecs)).dense(layer.spec.canonical_shape)


def build_exact(method, layers, weights, codecs, weight_on_down: bool):
    """``exact_linear`` / ``cat``: concatenated factors (rank ``Σ r_a``), or the dense sum for ``dense_delta``."""
    payloads = {}
    if method == "dense_delta":
        return {layer.path: ("dense", weighted_sum(layer, weights, codecs)) for layer in layers}, None
    codec = _CODECS[method]
    for layer in layers:
        limit = codec.max_rank(layer.spec)
        cp = codec.native_cp(layer.spec) and bool(layer.spec.kernel_size)
        native = [to_native(p, codec, layer.spec) for p in read_weighted(layer, weights, codecs, weight_on_down)]
        if any(n is None for n in native):
            return None, f"layer {layer.path!r} mixes CP and flattened conv factors"
        total = Factors.cat(native)
        if total.rank > limit:
            if cp:
                return None, f"CP rank {total.rank} exceeds the maximum {limit} on {layer.path!r}"
            flat = total.flattened()
            total = svd_factors(truncated_svd_of_product(flat.up, flat.modes[0], limit), codec)
        payloads[layer.path] = ("factors", total)
    return payloads, None


# ------------------------------------------------------------------------------- PEFT's factor-wise types
def factorwise(layers, weights, codecs, rule: str, density: float, gen, majority_sign_method: str) -> dict:
    """PEFT's ``linear`` / ``ties`` / ``dare_*`` / ``magnitude_prune`` on the factors: ``{path: Factors}``.

    Per layer, with the adapters present there (all of one rank ``r``; conv CP factors flattened,
    ``A_a = V_a ⊙ P_a``) and ``c_a = w_a s_a``::

        A = rule({A_a}, {sgn(c_a)·√|c_a|}),   B = rule({B_a}, {√|c_a|}),   ΔW = B A  (scale 1)

    ``rule`` prunes/merges each factor list entry-wise exactly like ``peft.utils.merge_utils``
    (all ``A`` masks are drawn before the ``B`` masks, adapters in the given order, layers in
    model order).  Not ``Σ w_a ΔW_a`` in general (cross terms); ``exact_linear``/``cat`` are.
    """
    out = {}
    for layer in layers:
        parts = present(layer, weights, codecs)
        ranks = sorted({a.r for a, _, _ in parts})
        if len(ranks) > 1:
            raise LavaConfigError(
                f"PEFT's factor-wise combinations add the A and B factors entry by entry and need equal ranks, "
                f"but layer {layer.path!r} has ranks {ranks}; use combination_type='cat' / 'exact_linear' "
                "(exact, rank = sum) or an '*_svd' type"
            )
        downs, ups, wa, wb = [], [], [], []
        for a, w, codec in parts:
            with torch.no_grad():
                f = codec.read(a, scaled=False).flattened()
            downs.append(f.modes[0].detach().float().cpu())
            ups.append(f.up.detach().float().cpu())
            c = w * a.scale
            wa.append(math.sqrt(abs(c)) * (1 if c >= 0 else -1))
            wb.append(math.sqrt(abs(c)))
        down = combine_dense(downs, wa, rule, density, gen, majority_sign_method)
        up = combine_dense(ups, wb, rule, density, gen, majority_sign_method)
        out[layer.path] = Factors(up, [down])
    return out


def build_given(method, layers, combined: dict):
    """Write precomputed matrix-form factors (``factorwise``) into ``method``'s native form."""
    if method == "dense_delta":
        return {layer.path: ("dense", combined[layer.path].dense(layer.spec.canonical_shape)) for layer in layers}, None
    codec = _CODECS[method]
    payloads = {}
    for layer in layers:
        native = to_native(combined[layer.path], codec, layer.spec)
        if native is None:
            return None, f"layer {layer.path!r} is stored in CP form by {method!r}; the factor-wise result is a flattened matrix"
        if native.rank > codec.max_rank(layer.spec):
            return None, f"rank {native.rank} exceeds the maximum on {layer.path!r}"
        payloads[layer.path] = ("factors", native)
    return payloads, None


# ------------------------------------------------------------------------------- svd and *_svd
@dataclass
class SvdOptions:
    rank: int | None
    clamp: float | None
    full_matrices: bool
    driver: str | None
    als_iters: int

    @property
    def peft_path(self) -> bool:
        """PEFT's fp32 procedure (clamp / cuSOLVER driver) instead of the float64 truncated SVD."""
        return self.clamp is not None or self.driver is not None


def build_svd(method, layers, weights, codecs, targets: dict, options: SvdOptions):
    """A rank-``R`` refit of each layer's combined ``ΔW`` (``targets``, or the weighted sum of the factors)."""
    if method == "dense_delta":
        return {layer.path: ("dense", targets[layer.path] if layer.path in targets
                             else weighted_sum(layer, weights, codecs)) for layer in layers}, None
    codec = _CODECS[method]
    payloads = {}
    for layer in layers:
        spec = layer.spec
        rank = options.rank or max(a.r for a in layer.adapters if a is not None)
        rank = min(rank, codec.max_rank(spec))
        shape = spec.canonical_shape
        parts = read_weighted(layer, weights, codecs) if layer.path not in targets else None
        if codec.native_cp(spec) and spec.kernel_size:
            if options.peft_path:
                return None, f"svd_clamp / svd_driver apply to a matrix SVD; {method!r} stores {layer.path!r} in CP form"
            payloads[layer.path] = ("factors", _cp_refit(parts, targets.get(layer.path), shape, rank, options.als_iters))
        elif options.peft_path:
            target = targets[layer.path] if parts is None else Factors.cat(parts).dense(shape)
            matrix = target.reshape(shape[0], -1).to(options_device(layer, options))
            up, down = peft_svd(matrix, rank, options.clamp, options.full_matrices, options.driver)
            payloads[layer.path] = ("factors", Factors(up.float().cpu(), [down.float().cpu()]))
        elif parts is not None:
            flat = Factors.cat(parts).flattened()
            payloads[layer.path] = ("factors", svd_factors(truncated_svd_of_product(flat.up, flat.modes[0], rank), codec))
        else:
            usv = truncated_svd(targets[layer.path].reshape(shape[0], -1), rank)
            payloads[layer.path] = ("factors", svd_factors(usv, codec))
    return payloads, None


def options_device(layer: LayerInput, options: SvdOptions) -> torch.device:
    """Where PEFT's SVD runs: the adapters' device when a cuSOLVER ``driver`` is asked for, else the CPU."""
    if options.driver is None:
        return torch.device("cpu")
    return next(next(a.parameters()).device for a in layer.adapters if a is not None)


def _cp_refit(parts, target, shape, rank: int, als_iters: int) -> Factors:
    """CP rank-``R`` refit of a conv increment: exact concatenation if it fits, else CP-ALS."""
    if target is None:
        target = Factors.cat(parts).dense(shape)
    concat = Factors.cat(parts) if parts is not None and all(p.is_cp for p in parts) else None
    if concat is not None and concat.rank <= rank:
        return concat.padded(rank)
    init = _cp_init(concat, rank) if concat is not None else None
    mats, _ = cp_als(target, rank, init=init, n_iter=als_iters)
    return Factors(mats[0].float(), [m.T.contiguous().float() for m in mats[1:]])


def svd_factors(usv, codec: FactorCodec) -> Factors:
    u, s, vh = usv
    if codec.svd_singular_values == "down":
        return Factors(u.float(), [(s.unsqueeze(1) * vh).float()])
    return Factors((u * s).float(), [vh.float()])


def _cp_init(concat: Factors, rank: int) -> list[torch.Tensor]:
    """Start ALS from the ``rank`` concatenated components of largest norm ``‖u_j‖·Π‖m_j‖``."""
    norms = concat.up.norm(dim=0)
    for m in concat.modes:
        norms = norms * m.norm(dim=1)
    keep = torch.topk(norms, rank).indices
    return [concat.up[:, keep]] + [m[keep].T for m in concat.modes]
