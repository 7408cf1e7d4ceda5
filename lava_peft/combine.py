"""Weighted combination of adapters: ``model.add_weighted_adapter(adapters, weights, name, combination_type)``.

The result is a normal adapter (saveable, mergeable, usable in mixed batches).  Per adapted
layer, ``ΔW_a`` is the increment of adapter ``a`` in the canonical layout ``(O, I, K1, …, KN)``,
``w_a`` its weight, ``s_a`` its scale, and for low-rank methods ``B_a``/``A_a`` its up/down
factors (LoRA ``lora_B``/``lora_A``; LAVA ``U``/``V``, conv CP flattened to ``A_j = V_j ⊗ P_j``).
The PEFT names mean what HF PEFT 0.21's ``LoraModel.add_weighted_adapter`` computes
(``tests/test_combine_peft.py`` compares with the real ``peft``):

``"exact_linear"`` (default) — ``ΔW = Σ_a w_a ΔW_a`` exactly, by concatenating factors (rank
    ``Σ r_a``): LoRA/LAVA matrices ``[w_1 s_1 B_1 | …] [A_1; …]``; LAVA on a conv stays CP (the
    components of all inputs); a mix of CP and flattened factors gives LoRA; adapters of one
    sparse method (SHiRA, SFT) give that method on the union of supports; methods without
    factors give ``dense_delta``.  If ``Σ r_a`` exceeds the layer's maximum rank the
    matrix is re-factored exactly by an SVD of its factors.
``"cat"`` — PEFT's name for the same exact concatenation; like PEFT the weight goes into the
    down factor (``A = [w_1 s_1 A_1; …]``, ``B = [B_1 | …]``, scale 1).  PEFT pads every layer to
    ``Σ`` of the config ranks; here each layer has the rank of the adapters on it (same ``ΔW``).
``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` — PEFT's
    factor-wise rules (:func:`~lava_peft.combine_build.factorwise`): with ``c_a = w_a s_a``,
    ``A = rule(A_a; sgn c_a √|c_a|)`` and ``B = rule(B_a; √|c_a|)``; equal ranks required; the
    result is not ``Σ w_a ΔW_a`` (cross terms ``B_a A_b``).  A LAVA conv input is flattened, so
    the result is a LoRA conv adapter.  Inputs without factors (SHiRA, SFT, ``dense_delta``):
    the rule is applied to ``ΔW_a`` instead and the result is ``dense_delta`` (``"linear"``
    there is the exact sum).
``"svd"``, ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"`` —
    the rule (``svd``: the weighted sum) on the dense ``ΔW_a``, then the best rank-``R`` fit
    (``R = svd_rank``, default the largest input rank on the layer; clipped to the method's
    maximum) of the flattening ``O × (I·ΠK)``: ``B = U_R S_R``, ``A = V_Rᵀ`` (LAVA keeps ``U``
    orthonormal, ``S`` in ``V``).  Computed in float64 (from the factors, without forming
    ``ΔW``, for ``svd``); with ``svd_clamp`` (or ``svd_driver``) PEFT's fp32 procedure is run
    step for step (:func:`~lava_peft.combine_math.peft_svd`), since the clamp depends on the
    singular vectors' signs.  A conv LAVA result is refitted in CP form by ALS (the exact
    concatenation if its rank fits).  ``result_method="dense_delta"`` skips the SVD and keeps the
    full ``ΔW`` of the rule.

LAVA with ``factorization="tucker"`` (Tucker-2 conv factors ``U``, ``core``, ``V``): the result's
codec follows the first LAVA input's config.  ``exact_linear`` / ``cat`` keep the cores
(block-diagonal core, CP inputs joined with a superdiagonal core, mode ranks above ``O`` / ``I``
re-factored exactly by QR); the ``*_svd`` types refit by truncated HOSVD at mode ranks
``(min(R, O), min(R, I))`` (``svd_clamp`` / ``svd_driver``: a LoRA result, PEFT's matrix SVD); the
factor-wise types flatten the conv factors (``A = core ×₂ Vᵀ`` unfolded) and give a LoRA adapter.

Rules (``peft.utils.merge_utils``; ``d = density``): magnitude prune keeps the ``⌊d·numel⌋``
largest ``|τ|``; DARE keeps each entry with ``torch.bernoulli(d)`` and rescales by ``1/d``; TIES
elects ``σ = sgn Σ τ_a`` (``"total"``) or ``sgn Σ sgn τ_a`` (``"frequency"``) on the unweighted
pruned tensors and averages the weighted ones that agree.  DARE masks come from one
``torch.Generator`` (``generator=``, or seeded by ``seed``) drawn layer by layer in model order,
per layer in PEFT's order (factor-wise: every ``A`` then every ``B``; ``*_svd``: each ``ΔW_a``
in the base layer's layout), absent adapters drawing nothing; then for ``modules_to_save``.
A generator in the state of PEFT's global RNG at its first draw reproduces PEFT's masks.

``modules_to_save`` copies are combined as task vectors ``θ = θ_0 + rule(θ_a − θ_0)`` (PEFT
refuses two inputs with a copy of one module); an adapter without a copy contributes ``θ_0``.
The result's config is one of the result method with the exact adapted paths as
``target_modules``, scale 1 (``alpha = r``) and per-layer ranks in ``rank_pattern``.  Nothing in
the model changes until every layer's result has been computed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .combine_build import (LayerInput, SvdOptions, build_exact, build_given, build_svd, dense_target, factorwise,
                            weighted_sum)
from .combine_math import combine_dense, cp_als
from .config import AdapterConfig, config_class, registered_methods
from .errors import LavaConfigError
from .inject import adapted_layers, saved_module_wrappers
from .methods.base_init import base_init_kind
from .methods.factors import (FactorCodec, Factors, SparseCodec, _CODECS, _SPARSE_CODECS, adapter_factors, factor_codec,
                              method_of, register_factor_codec, register_sparse_codec, to_native)

EXACT_TYPES = ("exact_linear", "cat")
FACTORWISE_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = EXACT_TYPES + FACTORWISE_TYPES + SVD_TYPES
_DENSITY_TYPES = tuple(t for t in COMBINATION_TYPES if t.startswith(("ties", "dare", "magnitude")))
SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


def combination_rule(combination_type: str) -> str:
    """The entry-wise rule of a type: ``"ties_svd"`` → ``"ties"``; ``"svd"``, ``"cat"``, ``"exact_linear"`` → ``"linear"``."""
    if combination_type in ("svd",) + EXACT_TYPES:
        return "linear"
    return combination_type[: -len("_svd")] if combination_type.endswith("_svd") else combination_type


# =============================================================================== the entry point
@dataclass
class CombinationReport:
    """What :func:`add_weighted_adapter` built: result method, per-layer rank and relative error.

    For a sparse result (:class:`SparseCodec`) ``ranks[path]`` is the number of stored entries.

    ``relative_error[path] = ‖ΔW_result − ΔW_target‖_F / ‖ΔW_target‖_F`` where the target is what
    the type defines before any refit (the weighted sum, the pruned/merged ``ΔW``, or the
    factor-wise product); 0 up to rounding for exact representations.
    """

    adapter_name: str
    method: str
    combination_type: str
    ranks: dict[str, int] = field(default_factory=dict)
    relative_error: dict[str, float] = field(default_factory=dict)


def add_weighted_adapter(
    model,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "exact_linear",
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
    generator: torch.Generator | None = None,
    result_method: str | None = None,
    als_iters: int = 200,
) -> CombinationReport:
    """Create ``adapter_name`` from ``adapters`` and ``weights`` (see the module docstring).

    Args:
        model: an :class:`~lava_peft.AdaptedModel`.
        adapters / weights: input adapter names and one weight each (any real number).
        combination_type: one of :data:`COMBINATION_TYPES` (PEFT's names mean PEFT's results;
            ``"exact_linear"``, the default, is the exact weighted sum).
        svd_rank: target rank of the ``svd`` types (default: the largest input rank per layer).
        svd_clamp: quantile in ``[0, 1]`` at which PEFT clamps the SVD factors (``svd`` types).
        svd_full_matrices: passed to ``torch.linalg.svd`` on PEFT's path (does not change results).
        svd_driver: cuSOLVER routine (``gesvd``/``gesvdj``/``gesvda``); CUDA adapters only.
        density: fraction kept by the ties / dare / magnitude_prune types (required there), in (0, 1].
        majority_sign_method: ``"total"`` or ``"frequency"`` (TIES sign election).
        seed / generator: the DARE masks' random source (``generator`` wins if given).
        result_method: force the method of the result (e.g. ``"lora"``; ``"dense_delta"`` keeps a
            full ``ΔW``); by default the inputs' method if they share one that can hold the
            result, else LoRA (factored results) or ``"dense_delta"``.
        als_iters: maximal CP-ALS sweeps for conv LAVA ``svd`` results.
    Returns:
        a :class:`CombinationReport`. The new adapter is added inactive (``set_adapter`` it).
    """
    names, weights = _check_arguments(model, adapters, weights, adapter_name, combination_type, density, svd_rank,
                                      svd_clamp, svd_driver, majority_sign_method, result_method)
    methods = [model.peft_config[n].method for n in names]
    decomposed = sorted({n for n in names for _, layer in adapted_layers(model.model)
                         if n in layer.adapters and not layer.adapters[n].merges_additively})
    if decomposed:
        raise LavaConfigError(
            f"adapters {decomposed} are weight-decomposed (DoRA): their magnitude rescales W0 + ΔW per channel, which "
            "no combination type can add up; combine plain LoRA/LAVA adapters, or merge_and_unload the DoRA one"
        )
    configs = [model.peft_config[n] for n in names]
    codecs = [_CODECS[m].for_config(c) if m in _CODECS else None for m, c in zip(methods, configs)]
    all_factored = all(c is not None for c in codecs)
    mode = _mode(combination_type, all_factored)
    if mode == "exact":
        report = _sparse_linear(model, names, weights, adapter_name, result_method, combination_type)
        if report is not None:
            return report
    rule = combination_rule(combination_type)
    density = 1.0 if density is None else float(density)
    layers = _collect_layers(model, names)
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    options = SvdOptions(svd_rank, svd_clamp, bool(svd_full_matrices), svd_driver, als_iters)
    if svd_driver is not None:
        for layer in layers:
            if any(next(a.parameters()).device.type != "cuda" for a in layer.adapters if a is not None):
                raise LavaConfigError("svd_driver selects a cuSOLVER routine and needs adapters on CUDA; drop svd_driver")

    targets: dict[str, torch.Tensor] = {}
    combined = None
    if mode == "factorwise":
        combined = factorwise(layers, weights, codecs, rule, density, gen, majority_sign_method)
        targets = {layer.path: combined[layer.path].dense(layer.spec.canonical_shape) for layer in layers}
    elif mode == "dense" or (mode == "svd" and (rule != "linear" or not all_factored or options.peft_path)):
        targets = {layer.path: dense_target(layer, weights, rule, density, gen, majority_sign_method) for layer in layers}

    candidates = _candidates(methods, codecs, combination_type, mode, result_method)
    errors: list[str] = []
    payloads = None
    for method in candidates:
        out_codec = _result_codec(method, configs)
        if mode == "exact":
            payloads, why = build_exact(method, layers, weights, codecs, combination_type == "cat", out_codec)
        elif mode == "factorwise":
            payloads, why = build_given(method, layers, combined, out_codec)
        elif mode == "dense":
            payloads, why = {layer.path: ("dense", targets[layer.path]) for layer in layers}, None
        else:
            payloads, why = build_svd(method, layers, weights, codecs, targets, options, out_codec)
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
    saved_states = _combine_saved_modules(model, names, weights, rule, density, gen, majority_sign_method)
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
                target = weighted_sum(layer, weights, codecs)
            got = adapter.delta_weight().detach().double().cpu()
            denom = target.double().norm().item()
            report.relative_error[path] = (got - target.double()).norm().item() / denom if denom > 0 else 0.0
    model.commit(plan)
    for path, wrapper in saved_module_wrappers(model.model):
        if path in saved_states and adapter_name in wrapper.copies:
            wrapper.copies[adapter_name].load_state_dict(saved_states[path])
    return report


def _mode(combination_type: str, all_factored: bool) -> str:
    """``exact`` | ``factorwise`` | ``dense`` (factor-wise type on inputs without factors) | ``svd``."""
    if combination_type in EXACT_TYPES or (combination_type == "linear" and not all_factored):
        return "exact"
    if combination_type in FACTORWISE_TYPES:
        return "factorwise" if all_factored else "dense"
    return "svd"


def _sparse_linear(model, names, weights, adapter_name, result_method, combination_type) -> CombinationReport | None:
    """Exact sum (``exact_linear`` / ``cat``) of adapters of one sparse method, as that method on the union of supports.

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
    report = CombinationReport(adapter_name, method, combination_type)
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
def _check_arguments(model, adapters, weights, adapter_name, combination_type, density, svd_rank, svd_clamp,
                     svd_driver, majority_sign_method, result_method):
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
    if combination_type in _DENSITY_TYPES:
        if density is None:
            raise LavaConfigError(f"combination_type={combination_type!r} needs density=<fraction kept in (0, 1]>")
        if not (0 < float(density) <= 1):
            raise LavaConfigError(f"density must be in (0, 1]; got {density}")
    elif density is not None:
        raise LavaConfigError(f"density is only used by {list(_DENSITY_TYPES)}, not {combination_type!r}; drop it")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise LavaConfigError(f"svd_rank must be a positive integer; got {svd_rank!r}")
    if combination_type not in SVD_TYPES:
        for arg, value in (("svd_rank", svd_rank), ("svd_clamp", svd_clamp), ("svd_driver", svd_driver)):
            if value is not None:
                raise LavaConfigError(f"{arg} applies to the SVD types {list(SVD_TYPES)}, not {combination_type!r}; "
                                      "drop it or pick one of those types")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                  or not 0 <= svd_clamp <= 1):
        raise LavaConfigError(f"svd_clamp is a quantile in [0, 1]; got {svd_clamp!r}")
    if svd_driver not in SVD_DRIVERS:
        raise LavaConfigError(f"svd_driver must be one of {list(SVD_DRIVERS)}; got {svd_driver!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise LavaConfigError(f"majority_sign_method must be 'total' or 'frequency'; got {majority_sign_method!r}")
    if result_method is not None and result_method not in registered_methods():
        raise LavaConfigError(f"result_method={result_method!r} is not a registered method {registered_methods()}")
    if combination_type in SVD_TYPES and svd_rank is None and result_method != "dense_delta":
        missing = [n for n in names if model.peft_config[n].method not in _CODECS]
        if missing:
            raise LavaConfigError(
                f"adapters {missing} have no rank (method without factors); give svd_rank=<target rank>"
            )
    return names, weights


def _collect_layers(model, names) -> list[LayerInput]:
    layers = []
    for path, layer in adapted_layers(model.model):
        adapters = [layer.adapters[n] if n in layer.adapters else None for n in names]
        if any(a is not None for a in adapters):
            layers.append(LayerInput(path, layer.spec, layer.ops, adapters))
    if not layers:
        raise LavaConfigError(f"adapters {names} adapt no layer; nothing to combine")
    return layers


def _candidates(methods, codecs, combination_type, mode, result_method) -> list[str]:
    all_factored = all(c is not None for c in codecs)
    if result_method is not None:
        if result_method == "dense_delta":
            return [result_method]
        if result_method not in _CODECS:
            raise LavaConfigError(
                f"result_method={result_method!r} has no factor codec; use one of {sorted(_CODECS)} or 'dense_delta'"
            )
        if mode == "dense":
            raise LavaConfigError(
                f"{combination_type!r} on inputs without factors gives a dense increment; use "
                f"{combination_rule(combination_type) + '_svd'!r} with svd_rank=<rank> to refit it as {result_method!r}"
            )
        if mode == "exact" and not all_factored:
            raise LavaConfigError(
                f"an exact {combination_type!r} {result_method!r} result needs factored inputs, but methods "
                f"{sorted({m for m, c in zip(methods, codecs) if c is None})} have none; use combination_type='svd' "
                "or result_method='dense_delta'"
            )
        return [result_method]
    if mode == "dense" or (mode == "exact" and not all_factored):
        return ["dense_delta"]
    out = [methods[0]] if len(set(methods)) == 1 and methods[0] != "lora" else []
    out.append("lora")
    return out + (["dense_delta"] if mode == "exact" else [])


def _result_codec(method: str, input_configs: list[AdapterConfig]) -> FactorCodec | None:
    """The codec of a ``method`` result: the one for the input config :func:`_result_config` copies
    (e.g. LAVA with ``factorization="tucker"``), or the method's plain codec."""
    codec = _CODECS.get(method)
    if codec is None:
        return None
    base = next((c for c in input_configs if isinstance(c, config_class(method))), None)
    return codec if base is None else codec.for_config(base)


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
        if base_init_kind(getattr(base, "init", None)):  # the result is built, not initialised from the base
            fields["init"] = cls.__dataclass_fields__["init"].default
        return dataclasses.replace(base, **fields)
    return cls(**fields)


def _combine_saved_modules(model, names, weights, rule, density, gen, majority_sign_method):
    """``{wrapper path: combined state dict}`` for every ``modules_to_save`` module some input owns (``rule`` on
    the task vectors ``θ_a − θ_0``)."""
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
    "EXACT_TYPES",
    "FACTORWISE_TYPES",
    "FactorCodec",
    "Factors",
    "SVD_TYPES",
    "SparseCodec",
    "adapter_factors",
    "add_weighted_adapter",
    "combination_rule",
    "combine_dense",
    "cp_als",
    "factor_codec",
    "method_of",
    "to_native",
    "register_factor_codec",
    "register_sparse_codec",
]
