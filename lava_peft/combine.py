"""Weighted combination of adapters, and the factor view of low-rank methods.

``model.add_weighted_adapter(adapters, weights, name, combination_type=...)`` builds a
new, normal adapter (saveable, mergeable, usable in mixed batches) from existing ones.
Per adapted layer, with ``ΔW_a`` the increment of adapter ``a`` in the canonical layout
``(O, I, K1, …, KN)`` and ``w_a`` its weight:

``"linear"`` — exact weighted sum ``ΔW = Σ_a w_a ΔW_a``.  Where the methods expose
    factors (see :class:`FactorCodec`) the result *concatenates* them, so it stays a
    factored adapter of rank ``Σ_a r_a``:

    * LoRA / LAVA on Linear and Embedding: ``ΔW_a = U_a V_a`` (scale folded into
      ``U_a``), so ``[w_1 U_1 | … | w_n U_n] · [V_1; …; V_n] = Σ_a w_a ΔW_a``;
    * LAVA on a conv (CP): the sum of two CP decompositions is the CP decomposition
      with the components of both — ``U``, ``V``, ``P_k`` are concatenated along the
      component axis (CP rank ``Σ r_a``);
    * LoRA conv, or a mix of methods: every CP component is rank 1 in the flattening
      ``O × (I·K1·…·KN)`` (``down_j = V_j ⊗ P_{1j} ⊗ … ⊗ P_{Nj}``), so everything is a
      flattened low-rank matrix and the result is a LoRA adapter.

    If ``Σ r_a`` exceeds what the result method allows on a layer (e.g. LoRA rank >
    ``min(O, I·ΠK)``), the matrix is re-factored exactly by an SVD of its (low-rank)
    factors at the maximal rank.  Methods without factors give a ``dense_delta``
    adapter holding ``Σ_a w_a ΔW_a`` itself — except for sparse methods with a
    :class:`SparseCodec` (SHiRA): adapters of one such method give an adapter of that
    method on the *union* of the supports, ``v = Σ_a w_a v_a`` (exact, scattered onto
    the union).  Note: HF PEFT's ``"linear"`` sums the
    LoRA *factors* (``(Σ√w B)(Σ√w A)``, which has cross terms); ours is the exact sum
    (PEFT's ``"cat"``).

``"svd"`` — the best rank-``R`` approximation of ``Σ_a w_a ΔW_a`` (``R = svd_rank``, by
    default the largest input rank on the layer, as in PEFT; clipped to the method's
    maximum).  Matrix form: truncated SVD ``U_R S_R V_Rᵀ`` of the flattening
    ``O × (I·ΠK)`` (computed from the factors, without forming ``ΔW``, when the inputs
    are factored).  LAVA keeps ``U = U_R`` orthonormal (``S`` goes into ``V``; its
    orthogonality penalty is then 0); LoRA follows PEFT (``B = U_R S_R``, ``A = V_Rᵀ``).
    For a conv LAVA result the *CP* form is refitted at rank ``R`` by alternating
    least squares (:func:`cp_als`), started from the ``R`` largest concatenated
    components; if the inputs' total CP rank is ``≤ R`` the exact concatenation is used
    (zero-padded).  The achieved relative error per layer is in the returned report.

``"ties"`` / ``"dare_linear"`` / ``"dare_ties"`` / ``"magnitude_prune"`` — on the dense
    ``ΔW_a`` (the "task vectors"), with PEFT's definitions
    (``peft.utils.merge_utils``), ``d = density``:

    * magnitude prune: keep the ``⌊d·numel⌋`` largest ``|ΔW_a|`` entries of each layer;
    * DARE: keep each entry with probability ``d`` and rescale by ``1/d``.  Masks are
      ``torch.rand(shape, generator=g) < d`` with one ``torch.Generator`` seeded with
      ``seed``, drawn layer by layer (model order), adapter by adapter (given order),
      then for ``modules_to_save`` tensors;
    * TIES sign election on the pruned ``τ_a``: ``σ = sgn(Σ_a τ_a)`` (``"total"``) or
      ``sgn(Σ_a sgn τ_a)`` (``"frequency"``), ``σ = +1`` where 0; disjoint merge
      ``ΔW = Σ_a w_a τ_a [sgn τ_a = σ] / max(1, Σ_a [sgn τ_a = σ])``;
    * ``magnitude_prune`` / ``dare_linear``: ``Σ_a w_a τ_a``; ``ties`` / ``dare_ties``:
      the disjoint merge.

    The result is full rank in general, so it is a ``dense_delta`` adapter; give
    ``svd_rank`` to refit it as a low-rank (same-method or LoRA) adapter instead
    (PEFT's ``"ties_svd"`` etc.).

``modules_to_save`` copies are combined as task vectors too: ``θ = θ_0 + combine(θ_a −
θ_0)`` with the dense rule of the combination type (``"linear"`` for ``"svd"``); an
adapter without a copy contributes ``θ_a = θ_0``.

The result's config is a config of the result method with ``target_modules`` the exact
adapted paths, scale 1 (``alpha = r``) and per-layer ranks in ``rank_pattern`` (keys
``^path$``); fields such as ``orth_lambda`` are copied from the first input of that
method.  Nothing in the model changes until every layer's result has been computed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .config import AdapterConfig, config_class, registered_methods
from .errors import LavaConfigError
from .combine_math import combine_dense, cp_als, truncated_svd, truncated_svd_of_product
from .inject import adapted_layers, saved_module_wrappers
from .methods.base import LayerSpec
from .methods.factors import (FactorCodec, Factors, SparseCodec, _CODECS, _SPARSE_CODECS, adapter_factors, factor_codec,
                              method_of, register_factor_codec, register_sparse_codec, to_native)

COMBINATION_TYPES = ("linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_DENSE_TYPES = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


# =============================================================================== the entry point
@dataclass
class CombinationReport:
    """What :func:`add_weighted_adapter` built: result method, per-layer rank and relative error.

    For a sparse result (:class:`SparseCodec`) ``ranks[path]`` is the number of stored entries.

    ``relative_error[path] = ‖ΔW_result − ΔW_target‖_F / ‖ΔW_target‖_F`` where the target is the
    weighted sum (``linear``/``svd``) or the dense TIES/DARE/pruned result; 0 up to rounding
    for exact representations.
    """

    adapter_name: str
    method: str
    combination_type: str
    ranks: dict[str, int] = field(default_factory=dict)
    relative_error: dict[str, float] = field(default_factory=dict)


@dataclass
class _LayerInput:
    path: str
    spec: LayerSpec
    adapters: list  # adapter module or None, aligned with the names


def add_weighted_adapter(
    model,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "linear",
    *,
    density: float | None = None,
    seed: int = 0,
    svd_rank: int | None = None,
    majority_sign_method: str = "total",
    result_method: str | None = None,
    als_iters: int = 200,
) -> CombinationReport:
    """Create ``adapter_name`` from ``Σ w_a · adapters[a]`` (see the module docstring).

    Args:
        model: an :class:`~lava_peft.AdaptedModel`.
        adapters / weights: input adapter names and one weight each (any real number).
        combination_type: one of :data:`COMBINATION_TYPES`.
        density: fraction kept by ties / dare_* / magnitude_prune (required there), in (0, 1].
        seed: seeds the DARE masks.
        svd_rank: target rank for ``"svd"`` (default: the largest input rank per layer),
            or, for the pruning types, refit the dense result at this rank.
        majority_sign_method: ``"total"`` or ``"frequency"`` (TIES sign election).
        result_method: force the method of the result (e.g. ``"lora"``); by default the
            inputs' method if they all share one that can represent the result, else LoRA
            (factored results) or ``"dense_delta"``.
        als_iters: maximal CP-ALS sweeps for conv LAVA ``"svd"`` results.
    Returns:
        a :class:`CombinationReport`. The new adapter is added inactive (``set_adapter`` it).
    """
    names, weights = _check_arguments(model, adapters, weights, adapter_name, combination_type, density, svd_rank,
                                      majority_sign_method, result_method)
    if combination_type == "linear":
        report = _sparse_linear(model, names, weights, adapter_name, result_method)
        if report is not None:
            return report
    density = 1.0 if density is None else float(density)
    layers = _collect_layers(model, names)
    methods = [model.peft_config[n].method for n in names]
    codecs = [_CODECS.get(m) for m in methods]

    needs_dense = combination_type in _DENSE_TYPES or any(c is None for c in codecs)
    gen = torch.Generator().manual_seed(int(seed))
    targets: dict[str, torch.Tensor] = {}
    if needs_dense:
        for layer in layers:
            taus = [_delta(a, names[i], methods[i], layer) for i, a in enumerate(layer.adapters)]
            targets[layer.path] = combine_dense(taus, weights, combination_type, density, gen, majority_sign_method)

    factored_result = combination_type in ("linear", "svd") or svd_rank is not None
    candidates = _candidates(methods, codecs, combination_type, factored_result, result_method)
    errors: list[str] = []
    payloads = None
    for method in candidates:
        payloads, why = _build_payloads(method, layers, weights, codecs, combination_type, targets, svd_rank, als_iters)
        if payloads is not None:
            break
        errors.append(f"{method}: {why}")
    if payloads is None:
        raise LavaConfigError(
            f"cannot represent the {combination_type!r} combination of {names} as a {candidates} adapter ("
            + "; ".join(errors)
            + '). Leave result_method unset, or use result_method="lora" / "dense_delta"'
        )

    report = CombinationReport(adapter_name, method, combination_type)
    ranks = {}
    for layer in layers:
        kind, value = payloads[layer.path]
        ranks[layer.path] = value.rank if kind == "factors" else 1
    config = _result_config(method, [model.peft_config[n] for n in names], layers, ranks)
    plan = model.plan(adapter_name, config, target_names=[layer.path for layer in layers])

    # --- everything is computed and validated; from here on only in-place copies and the commit
    saved_states = _combine_saved_modules(model, names, weights, combination_type, density, gen, majority_sign_method)
    with torch.no_grad():
        for (path, _, adapter), layer in zip(plan.layers, layers):
            kind, value = payloads[path]
            if kind == "factors":
                _CODECS[method].write(adapter, value)
            else:
                adapter.delta.copy_(value / adapter.scale)
            report.ranks[path] = ranks[path]
            target = targets.get(path)
            if target is None:
                target = _weighted_sum_from_factors(layer, weights, codecs)
            got = adapter.delta_weight().detach().double()
            denom = target.double().norm().item()
            report.relative_error[path] = (got - target.double()).norm().item() / denom if denom > 0 else 0.0
    model.commit(plan)
    for path, wrapper in saved_module_wrappers(model.model):
        if path in saved_states and adapter_name in wrapper.copies:
            wrapper.copies[adapter_name].load_state_dict(saved_states[path])
    return report


def _sparse_linear(model, names, weights, adapter_name, result_method) -> CombinationReport | None:
    """Exact ``"linear"`` sum of adapters of one sparse method, as that method on the union of supports.

    Per layer: ``U = ∪_a idx_a`` (sorted) and ``v[p] += w_a·values_a[j]`` where ``U[p] = idx_a[j]``;
    no dense ``ΔW`` is formed.  ``None`` when the inputs are not all of one method with a
    :class:`SparseCodec` (or another ``result_method`` is asked for).
    """
    methods = {model.peft_config[n].method for n in names}
    method = methods.pop() if len(methods) == 1 else None
    codec = _SPARSE_CODECS.get(method)
    if codec is None or result_method not in (None, method):
        return None
    layers = _collect_layers(model, names)
    supports, values = {}, {}
    with torch.no_grad():
        for layer in layers:
            parts = [(a.sparse_delta(), w) for a, w in zip(layer.adapters, weights) if a is not None]
            union = torch.unique(torch.cat([idx.long().cpu() for (idx, _), _ in parts]))  # sorted
            summed = torch.zeros(union.numel(), dtype=torch.float32)
            for (idx, vals), w in parts:
                summed.index_add_(0, torch.searchsorted(union, idx.long().cpu()), vals.detach().float().cpu() * w)
            supports[layer.path], values[layer.path] = union, summed
    config = codec.result_config([model.peft_config[n] for n in names], supports)
    plan = model.plan(adapter_name, config, target_names=[layer.path for layer in layers])
    saved_states = _combine_saved_modules(model, names, weights, "linear", 1.0, None, "total")
    report = CombinationReport(adapter_name, method, "linear")
    with torch.no_grad():
        for path, _, adapter in plan.layers:
            codec.write(adapter, values[path])
            got = adapter.sparse_delta()[1]
            denom = values[path].double().norm().item()
            err = (got.detach().double().cpu() - values[path].double()).norm().item()
            report.ranks[path] = int(supports[path].numel())
            report.relative_error[path] = err / denom if denom > 0 else 0.0
    model.commit(plan)
    for path, wrapper in saved_module_wrappers(model.model):
        if path in saved_states and adapter_name in wrapper.copies:
            wrapper.copies[adapter_name].load_state_dict(saved_states[path])
    return report


# ------------------------------------------------------------------------------- helpers
def _check_arguments(model, adapters, weights, adapter_name, combination_type, density, svd_rank,
                     majority_sign_method, result_method):
    if isinstance(adapters, str):
        adapters = [adapters]
    names = model.check_known(list(adapters))
    if not names:
        raise LavaConfigError("adapters is empty; name at least one adapter to combine")
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise LavaConfigError(f"weights must be a list of numbers, one per adapter; got {weights!r}") from None
    if len(weights) != len(names):
        raise LavaConfigError(f"got {len(weights)} weights for {len(names)} adapters {names}; give one weight each")
    if not all(math.isfinite(w) for w in weights):
        raise LavaConfigError(f"weights must be finite; got {weights}")
    model.check_new_name(adapter_name)
    if combination_type not in COMBINATION_TYPES:
        raise LavaConfigError(f"combination_type={combination_type!r} is unknown; use one of {list(COMBINATION_TYPES)}")
    if combination_type in _DENSE_TYPES:
        if density is None:
            raise LavaConfigError(f"combination_type={combination_type!r} needs density=<fraction kept in (0, 1]>")
        if not (0 < float(density) <= 1):
            raise LavaConfigError(f"density must be in (0, 1]; got {density}")
    elif density is not None:
        raise LavaConfigError(f"density is only used by {list(_DENSE_TYPES)}, not {combination_type!r}; drop it")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise LavaConfigError(f"svd_rank must be a positive integer; got {svd_rank!r}")
    if svd_rank is not None and combination_type == "linear":
        raise LavaConfigError('svd_rank does not apply to the exact "linear" combination; use combination_type="svd"')
    if majority_sign_method not in ("total", "frequency"):
        raise LavaConfigError(f"majority_sign_method must be 'total' or 'frequency'; got {majority_sign_method!r}")
    if result_method is not None and result_method not in registered_methods():
        raise LavaConfigError(f"result_method={result_method!r} is not a registered method {registered_methods()}")
    if combination_type == "svd" and svd_rank is None:
        missing = [n for n in names if model.peft_config[n].method not in _CODECS]
        if missing:
            raise LavaConfigError(
                f"adapters {missing} have no rank (method without factors); give svd_rank=<target rank>"
            )
    return names, weights


def _collect_layers(model, names) -> list[_LayerInput]:
    layers = []
    for path, layer in adapted_layers(model.model):
        present = [layer.adapters[n] if n in layer.adapters else None for n in names]
        if any(a is not None for a in present):
            layers.append(_LayerInput(path, layer.spec, present))
    if not layers:
        raise LavaConfigError(f"adapters {names} adapt no layer; nothing to combine")
    return layers


def _delta(adapter, name: str, method: str, layer: _LayerInput) -> torch.Tensor:
    if adapter is None:
        return torch.zeros(layer.spec.canonical_shape)
    try:
        with torch.no_grad():
            return adapter.delta_weight().detach().float().cpu()
    except NotImplementedError:
        raise LavaConfigError(
            f"adapter {name!r} (method {method!r}) has no weight increment (a side-branch method) and "
            "cannot be combined; combine weight-delta adapters only"
        ) from None


def _candidates(methods, codecs, combination_type, factored_result, result_method) -> list[str]:
    all_factored = all(c is not None for c in codecs)
    if result_method is not None:
        if result_method == "dense_delta":
            if combination_type == "svd" or (factored_result and combination_type != "linear"):
                raise LavaConfigError(
                    f"{combination_type!r} with svd_rank gives a low-rank adapter; result_method cannot be 'dense_delta'"
                )
            return [result_method]
        if result_method not in _CODECS:
            raise LavaConfigError(
                f"result_method={result_method!r} has no factor codec; use one of {sorted(_CODECS)} or 'dense_delta'"
            )
        if not factored_result:
            raise LavaConfigError(
                f"{combination_type!r} gives a dense increment; pass svd_rank=<rank> to refit it as {result_method!r}"
            )
        if combination_type == "linear" and not all_factored:
            raise LavaConfigError(
                f"an exact 'linear' {result_method!r} result needs factored inputs, but methods "
                f"{sorted({m for m, c in zip(methods, codecs) if c is None})} have none; use combination_type='svd' "
                "or result_method='dense_delta'"
            )
        return [result_method]
    out = []
    if combination_type == "linear":
        if all_factored:
            if len(set(methods)) == 1:
                out.append(methods[0])
            if "lora" not in out:
                out.append("lora")
        out.append("dense_delta")
    elif factored_result:
        if len(set(methods)) == 1 and codecs[0] is not None:
            out.append(methods[0])
        if "lora" not in out:
            out.append("lora")
    else:
        out.append("dense_delta")
    return out


def _read_weighted(layer: _LayerInput, weights, codecs) -> list[Factors]:
    parts = []
    for a, w, codec in zip(layer.adapters, weights, codecs):
        if a is not None:
            with torch.no_grad():
                f = codec.read(a)
            parts.append(Factors(f.up.detach().float().cpu() * w, [m.detach().float().cpu() for m in f.modes]))
    return parts


def _weighted_sum_from_factors(layer: _LayerInput, weights, codecs) -> torch.Tensor:
    parts = _read_weighted(layer, weights, codecs)
    return Factors.cat(parts).dense(layer.spec.canonical_shape)


def _build_payloads(method, layers, weights, codecs, combination_type, targets, svd_rank, als_iters):
    """``{path: ("factors", Factors) | ("dense", tensor)}`` for the result method, or ``(None, reason)``."""
    payloads = {}
    if method == "dense_delta":
        for layer in layers:
            dense = targets.get(layer.path)
            if dense is None:
                dense = _weighted_sum_from_factors(layer, weights, codecs)
            payloads[layer.path] = ("dense", dense)
        return payloads, None
    codec = _CODECS[method]
    for layer in layers:
        spec = layer.spec
        limit = codec.max_rank(spec)
        cp = codec.native_cp(spec) and bool(spec.kernel_size)
        have_factors = layer.path not in targets
        parts = _read_weighted(layer, weights, codecs) if have_factors else None
        if combination_type == "linear":
            native = [to_native(p, codec, spec) for p in parts]
            if any(n is None for n in native):
                return None, f"layer {layer.path!r} mixes CP and flattened conv factors"
            total = Factors.cat(native)
            if total.rank > limit:
                if cp:
                    return None, f"CP rank {total.rank} exceeds the maximum {limit} on {layer.path!r}"
                flat = total.flattened()
                total = _svd_factors(truncated_svd_of_product(flat.up, flat.modes[0], limit), codec)
            payloads[layer.path] = ("factors", total)
            continue
        # svd (or a pruned dense result refitted at svd_rank)
        rank = svd_rank
        if rank is None:
            rank = max(a.r for a in layer.adapters if a is not None)
        rank = min(rank, limit)
        shape = spec.canonical_shape
        if cp:
            target = targets[layer.path] if not have_factors else Factors.cat(parts).dense(shape)
            concat = None
            if have_factors and all(p.is_cp for p in parts):
                concat = Factors.cat(parts)
            if concat is not None and concat.rank <= rank:
                payloads[layer.path] = ("factors", concat.padded(rank))
                continue
            init = _cp_init(concat, rank, target) if concat is not None else None
            mats, _ = cp_als(target, rank, init=init, n_iter=als_iters)
            up = mats[0].float()
            payloads[layer.path] = ("factors", Factors(up, [m.T.contiguous().float() for m in mats[1:]]))
        else:
            if have_factors:
                flat = Factors.cat(parts).flattened()
                usv = truncated_svd_of_product(flat.up, flat.modes[0], rank)
            else:
                usv = truncated_svd(targets[layer.path].reshape(shape[0], -1), rank)
            payloads[layer.path] = ("factors", _svd_factors(usv, codec))
    return payloads, None


def _svd_factors(usv, codec: FactorCodec) -> Factors:
    u, s, vh = usv
    if codec.svd_singular_values == "down":
        return Factors(u.float(), [(s.unsqueeze(1) * vh).float()])
    return Factors((u * s).float(), [vh.float()])


def _cp_init(concat: Factors, rank: int, target: torch.Tensor) -> list[torch.Tensor]:
    """Start ALS from the ``rank`` concatenated components of largest norm ``‖u_j‖·Π‖m_j‖``."""
    norms = concat.up.norm(dim=0)
    for m in concat.modes:
        norms = norms * m.norm(dim=1)
    keep = torch.topk(norms, rank).indices
    return [concat.up[:, keep]] + [m[keep].T for m in concat.modes]


def _result_config(method: str, input_configs: list[AdapterConfig], layers, ranks: dict[str, int]) -> AdapterConfig:
    cls = config_class(method)
    paths = [layer.path for layer in layers]
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{re.escape(p)}$": r for p, r in ranks.items() if r != common}
    saved = []
    for cfg in input_configs:
        for s in cfg.modules_to_save or []:
            if s not in saved:
                saved.append(s)
    fields = dict(
        target_modules="(?:" + "|".join(re.escape(p) for p in paths) + ")",
        exclude_modules=None,
        modules_to_save=saved or None,
        r=common,
        alpha=float(common),
        rank_pattern=dict(pattern),
        alpha_pattern={k: float(v) for k, v in pattern.items()},
        dropout=0.0,
        use_rslora=False,
    )
    base = next((c for c in input_configs if isinstance(c, cls)), None)
    if base is not None:
        return dataclasses.replace(base, **fields)
    return cls(**fields)


def _combine_saved_modules(model, names, weights, combination_type, density, gen, majority_sign_method):
    """``{wrapper path: combined state dict}`` for every ``modules_to_save`` module some input owns."""
    rule = "linear" if combination_type == "svd" else combination_type
    out = {}
    for path, wrapper in saved_module_wrappers(model.model):
        owners = [n for n in names if n in wrapper.copies]
        if not owners:
            continue
        original = wrapper.original_module.state_dict()
        copies = [wrapper.copies[n].state_dict() if n in wrapper.copies else None for n in names]
        state = {}
        for key, base in original.items():
            if not base.is_floating_point():
                state[key] = wrapper.copies[owners[0]].state_dict()[key].clone()
                continue
            taus = [(c[key] - base).float() if c is not None else torch.zeros_like(base, dtype=torch.float32) for c in copies]
            combined = combine_dense(taus, weights, rule, density, gen, majority_sign_method)
            state[key] = (base.float() + combined).to(base.dtype)
        out[path] = state
    return out


__all__ = [
    "COMBINATION_TYPES",
    "CombinationReport",
    "FactorCodec",
    "Factors",
    "SparseCodec",
    "adapter_factors",
    "add_weighted_adapter",
    "combine_dense",
    "cp_als",
    "factor_codec",
    "method_of",
    "to_native",
    "register_factor_codec",
    "register_sparse_codec",
]
