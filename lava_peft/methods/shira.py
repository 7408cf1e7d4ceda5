"""SHiRA — Sparse High Rank Adapters (Bhardwaj et al., NeurIPS 2024; arXiv 2406.13175).

Fine-tune a fixed sparse subset ``M`` of the existing weight entries::

    W' = W + α·S,      supp(S) ⊆ M,      |M| = budget

``S`` is stored as a :class:`SparseDeltaAdapter`: a trainable fp32 **value vector**
``v ∈ R^budget`` (zeros at init, so ``ΔW = 0``) and a fixed **flat-index buffer**
``idx`` (sorted, unique; int32, or int64 for weights with ≥ 2³¹ entries) into the
canonical layout ``(O, I, K1, …, KN)``::

    ΔW.reshape(-1)[idx[j]] = α·v[j],      ΔW = 0 elsewhere.

The optimizer state therefore covers only ``v``; both tensors are the adapter's state
dict, i.e. its content in ``adapter_model.safetensors`` (``<module>.sparse_values``,
``<module>.sparse_indices``), and a file whose indices are not a valid mask is refused.

* **Budget** per layer (first that applies): ``budget_pattern[module]`` entries exactly;
  ``round(density · O·I·ΠK)``; else ``r·(O + I·ΠK)`` — the parameter count of LoRA-``r``
  (HF PEFT's convention).  ``α`` is ``alpha`` (no ``/r``: the paper's lemma shows no rank
  scale is needed; ``α = 1`` for training, any ``α`` at inference).
* **Mask** ``M``: the top ``budget`` scores of the registered builder ``mask_type``
  (:mod:`lava_peft.methods.sparse_masks`: ``random``, ``struct``, ``weight_magnitude``,
  ``grad``, ``snip``), in slot ``mask_slot`` (slot ``k`` = the ``k``-th next budget by
  score: non-overlapping masks for several adapters).  ``random`` and ``struct`` are
  built from the layer shape and ``seed`` alone; the others need the model — build them
  first with :func:`with_masks` (calibration batches for ``grad``/``snip``), which fills
  ``config.masks``; ``add_adapter`` then only reads them (plan, then commit).
* **Forward**: the weight path (one op with ``W0 + ΔW``), which serves Linear, Conv,
  GPT-2 ``Conv1D`` and Embedding alike; with input dropout active (training, ``dropout >
  0``) the increment runs as a separate op on the dropped input.
* **Merge / switch**: :meth:`SparseDeltaAdapter.sparse_delta` lets
  :class:`~lava_peft.layers.AdaptedLayer` add ``α·v`` into the base weight in place by
  ``index_add_`` / ``index_put_(accumulate=True)`` — no dense ``ΔW`` is formed.
* **Combination**: ``add_weighted_adapter(..., combination_type="linear")`` over SHiRA
  adapters gives a SHiRA adapter on the union of the supports (exact weighted sum).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import AdapterConfig, _pattern_lookup, register_method
from ..errors import AdapterFileError, LavaConfigError, LavaError
from ..fused_linear import frozen_linear_weight
from ..fused_sparse import csr_pattern, sparse_delta_linear, sparse_fusable
from ..layers import LayerSpec
from .base import DeltaAdapter, _dropout_active
from .sparse_masks import MaskInputs, calibration_gradients, mask_builder, select_top

SAVED_MASKS = "saved"
"""``ShiraConfig.masks`` of a config read from a file: the indices are in the adapter file."""

_INT32_LIMIT = 2**31 - 1


# =============================================================================== config
@dataclass
class ShiraConfig(AdapterConfig):
    """SHiRA: train ``budget`` fixed entries of each targeted weight (see the module docstring).

    Args:
        r: budget ``r·(O + I·ΠK)`` entries per layer (LoRA-``r``'s parameter count);
            ``rank_pattern`` overrides it per module.  Default 32 (HF PEFT's).
        alpha: ``α`` in ``W + α·S`` (not divided by ``r``); ``alpha_pattern`` per module.
        density: if set, the budget is ``round(density · numel)`` instead (``0 < density ≤ 1``).
        budget_pattern: ``{module: entries}`` exact per-module budgets (name, suffix or
            regex keys, like ``rank_pattern``); overrides ``r`` and ``density``.
        mask_type: a registered mask builder (``sparse_masks.registered_masks()``).
        seed: seeds the ``random`` mask (``randperm(numel)[:budget]``, as HF PEFT's
            ``random_mask`` with ``random_seed=seed``: layers of equal shape share a pattern).
        mask_slot: ``k`` takes the entries ranked ``[k·budget, (k+1)·budget)`` by score, so
            adapters with slots ``0, 1, …`` (equal budgets) have disjoint masks.
        masks: ``{module path: tensor}`` precomputed per layer — a floating score tensor of
            the canonical shape (``mask_slot`` then applies), or an explicit mask: a bool
            tensor of the canonical shape or 1-D integer flat indices, with exactly
            ``budget`` entries.  :func:`with_masks` fills it.  Not written to JSON; a config
            read from a file has ``masks="saved"`` (the indices come from the adapter file).
    """

    label: ClassVar[str] = "SHiRA"
    """The method's name in error messages (subclasses such as LT-SFT set their own)."""
    mask_helper: ClassVar[str] = "lava_peft.methods.shira.with_masks(model, config, ...)"
    """How to build ``masks`` from a model, named in error messages."""

    r: int = 32
    alpha: float = 1.0
    density: float | None = None
    budget_pattern: dict[str, int] = field(default_factory=dict)
    mask_type: str = "random"
    seed: int = 0
    mask_slot: int = 0
    masks: Any = field(default=None, compare=False, repr=False)

    def validate(self) -> None:
        super().validate()
        if self.masks != SAVED_MASKS:  # a saved adapter loads whatever builder made its indices
            mask_builder(self.mask_type)
        if self.use_rslora:
            raise LavaConfigError(
                f"{type(self).__name__}: {self.label} has no rank-dependent scale (α is used as is); drop use_rslora"
            )
        alphas = [("alpha", self.alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]
        for name, value in alphas:
            if not _is_number(value) or not math.isfinite(value):
                raise LavaConfigError(f"{type(self).__name__}.{name} must be a finite number; got {value!r}")
        if self.density is not None and not (_is_number(self.density) and 0 < self.density <= 1):
            raise LavaConfigError(
                f"{type(self).__name__}.density must be a fraction in (0, 1] (e.g. 0.01 for 1% of each weight); "
                f"got {self.density!r}"
            )
        for key, value in self.budget_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise LavaConfigError(
                    f"{type(self).__name__}.budget_pattern[{key!r}] must be a positive integer; got {value!r}"
                )
        for name in ("seed", "mask_slot"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LavaConfigError(f"{type(self).__name__}.{name} must be a non-negative integer; got {value!r}")
        masks = self.masks
        if masks is not None and masks != SAVED_MASKS:
            if not isinstance(masks, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in masks.items()
            ):
                raise LavaConfigError(
                    f"{type(self).__name__}.masks must map module paths to tensors (scores, a bool mask or flat "
                    f"indices); build it with {self.mask_helper}"
                )

    def scale_for(self, module_name: str) -> float:
        """``α`` itself: SHiRA's increment is ``α·S`` (no ``/r``)."""
        return float(self.alpha_for(module_name))

    def to_dict(self) -> dict[str, Any]:
        """JSON form; the masks are not JSON: the saved adapter file holds the indices (``masks="saved"``)."""
        return {**super().to_dict(), "masks": SAVED_MASKS}

    def mask_for(self, module_name: str) -> torch.Tensor | None:
        """The precomputed tensor of ``masks`` for this module (exact path first, then patterns), or ``None``."""
        if not isinstance(self.masks, dict):
            return None
        if module_name in self.masks:
            return self.masks[module_name]
        return _pattern_lookup(self.masks, module_name, None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shira_budget(spec: LayerSpec, config: ShiraConfig, module_name: str) -> int:
    """Number of trainable entries of this layer (raises :class:`LavaConfigError` if it cannot fit)."""
    shape = spec.canonical_shape
    numel = math.prod(shape)
    fan_in = numel // spec.out_dim
    exact = _pattern_lookup(config.budget_pattern, module_name, None)
    if exact is not None:
        budget, how, fix = exact, f"budget_pattern gives {exact}", f"lower budget_pattern for {module_name!r}"
    elif config.density is not None:
        budget = round(config.density * numel)
        how, fix = f"density={config.density} of {numel}", "raise density"
        if budget < 1:
            raise LavaConfigError(
                f"{config.label} density={config.density} keeps no entry of {module_name} (weight {shape}, "
                f"{numel} entries); "
                f"raise density to at least {1 / numel:.3g} or set budget_pattern={{'{module_name}': <entries>}}"
            )
    else:
        r = config.rank_for(module_name)
        budget = r * (spec.out_dim + fan_in)
        how = f"r·(O + I·ΠK) = {r}·({spec.out_dim} + {fan_in})"
        limit = numel // (spec.out_dim + fan_in)
        fix = (f"lower r to at most {limit} (or set rank_pattern={{'{module_name}': {limit}}})" if limit
               else f"use density=<fraction> or budget_pattern={{'{module_name}': <entries>}}")
    if budget > numel:
        raise LavaConfigError(
            f"{config.label} budget for {module_name} is {budget} entries ({how}) but its weight {shape} has only "
            f"{numel}; {fix}"
        )
    return budget


def index_dtype(numel: int) -> torch.dtype:
    """int32 flat indices where they fit (half the bytes of int64), else int64."""
    return torch.int32 if numel <= _INT32_LIMIT else torch.int64


def index_problem(indices: torch.Tensor, numel: int) -> str | None:
    """Why ``indices`` is not a valid sparse support of a ``numel``-entry weight (or ``None``).

    Valid: a 1-D integer tensor, strictly increasing (sorted and unique), in ``[0, numel)``.
    """
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        return f"has dtype {indices.dtype}, not an integer type"
    if indices.dim() != 1:
        return f"has shape {tuple(indices.shape)}, not 1-D"
    if indices.numel() == 0:
        return None
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= numel:
        return f"has entries in [{lo}, {hi}], outside [0, {numel})"
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        return "is not strictly increasing (indices must be sorted and unique)"
    return None


# =============================================================================== the sparse delta
class SparseDeltaAdapter(DeltaAdapter):
    """A sparse ``ΔW``: values ``v`` (fp32, trainable) at fixed flat indices ``idx`` of ``(O, I, *K)``.

    ``ΔW.reshape(-1)[idx] = scale·v``.  Subclasses (SHiRA; sparse fine-tuning masks in
    general) only decide the indices.  ``indices=None`` builds a placeholder of ``budget``
    entries that must be loaded from a file before use (``load_adapter``).
    """

    def __init__(self, spec: LayerSpec, config, module_name: str, indices: torch.Tensor | None, budget: int):
        super().__init__(spec, config, module_name)
        self.module_name = module_name
        self._numel = math.prod(spec.canonical_shape)
        self._awaiting_file = indices is None
        if indices is None:
            indices = torch.arange(budget)
        self.sparse_values = nn.Parameter(torch.zeros(indices.numel()))
        self.register_buffer("sparse_indices", indices.to(index_dtype(self._numel)).contiguous())

    # -- protocol ---------------------------------------------------------------
    def _ready(self) -> None:
        if self._awaiting_file:
            raise LavaError(
                f"the sparse adapter on {self.module_name} was built from a saved config (masks='saved') but its "
                "indices were never loaded; load it with model.load_adapter(dir), or give the config masks=None / "
                "masks=with_masks(...) to build new ones"
            )

    def sparse_delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx, scale·v)``: ``ΔW.reshape(-1)[idx] = scale·v`` in the canonical layout (merge / combine hook)."""
        self._ready()
        return self.sparse_indices, self.sparse_values * self.scale

    def delta_weight(self) -> torch.Tensor:
        """Dense ``ΔW``: ``zeros(numel).index_add(0, idx, v, alpha=scale)`` (its gradient w.r.t. ``v`` is
        ``∂L/∂ΔW`` gathered at ``idx``, times ``scale``)."""
        self._ready()
        flat = self.sparse_values.new_zeros(self._numel)
        flat = flat.index_add(0, self.sparse_indices, self.sparse_values, alpha=self.scale)
        return flat.view(self.spec.canonical_shape)

    def uses_weight_path(self) -> bool:
        """One op with ``W0 + ΔW`` on every layer type; a separate op only while input dropout is active."""
        return self.spec.kind == "embedding" or not _dropout_active(self)

    def uses_weight_path_for(self, x, layer) -> bool:
        """A plain frozen fp32 Linear on the CPU runs the fused sparse node instead (:meth:`fused_linear`)."""
        return self.uses_weight_path() and not self._sparse_node_applies(x, layer.base_layer)

    def _sparse_node_applies(self, x, base_layer) -> bool:
        base = frozen_linear_weight(base_layer)
        return (self.spec.kind == "linear" and not _dropout_active(self) and base is not None
                and sparse_fusable(x, base[0]))

    def fused_linear(self, x, weight, bias):
        """``x (W + s·S)ᵀ + b`` with the sparse weight gradient (:mod:`lava_peft.fused_sparse`), or ``None``."""
        if self.spec.kind != "linear" or _dropout_active(self) or not sparse_fusable(x, weight):
            return None
        self._ready()
        crow, cols = self._csr_pattern()
        return sparse_delta_linear(x, weight, bias, self.sparse_values, self.sparse_indices, crow, cols, self.scale)

    def _csr_pattern(self) -> tuple[torch.Tensor, torch.Tensor]:
        """CSR rows/columns of the mask in ``O×I``, cached until the index buffer changes (load, hot-swap)."""
        idx = self.sparse_indices
        key = (idx.data_ptr(), idx._version, idx.device)
        if getattr(self, "_csr_key", None) != key:
            self._csr = csr_pattern(idx, self.spec.out_dim, self._numel // self.spec.out_dim)
            self._csr_key = key
        return self._csr

    def max_rank(self) -> int:  # pragma: no cover - informational
        return min(self.spec.out_dim, self._numel // self.spec.out_dim)

    # -- files ------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Refuse an index buffer that is not a valid support (dtype, order, range, size) before copying it."""
        key = prefix + "sparse_indices"
        incoming = state_dict.get(key)
        if incoming is not None:
            problem = index_problem(incoming, self._numel)
            if problem is None and incoming.shape != self.sparse_indices.shape:
                problem = f"has {incoming.numel()} entries where the config gives {self.sparse_indices.numel()}"
            if problem is not None:
                raise AdapterFileError(
                    f"{self.module_name}.sparse_indices {problem}; it is not a valid mask of the weight "
                    f"{self.spec.canonical_shape}. The adapter file is corrupt or was edited"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if incoming is not None:
            self._awaiting_file = False

    def extra_repr(self) -> str:
        return f"entries={self.sparse_values.numel()}, of={self._numel}, scale={self.scale}"


# =============================================================================== SHiRA
def _indices_from_given(given: torch.Tensor, spec: LayerSpec, budget: int, slot: int, name: str) -> torch.Tensor:
    """Flat indices from a precomputed score tensor, bool mask or index list (checked)."""
    shape = spec.canonical_shape
    numel = math.prod(shape)
    if given.is_floating_point():
        if tuple(given.shape) != shape:
            raise LavaConfigError(
                f"masks[{name!r}] scores have shape {tuple(given.shape)}; give them in the canonical layout {shape} "
                "(GPT-2 Conv1D / Embedding weights are stored transposed)"
            )
        return select_top(given, budget, slot)
    if given.dtype == torch.bool:
        if tuple(given.shape) != shape:
            raise LavaConfigError(f"masks[{name!r}] bool mask has shape {tuple(given.shape)}; expected {shape}")
        indices = torch.nonzero(given.reshape(-1)).flatten()
    else:
        indices = given.detach().reshape(-1).long().cpu()
        problem = index_problem(given.detach().cpu(), numel)
        if problem is not None:
            raise LavaConfigError(f"masks[{name!r}] flat indices {problem}; give sorted unique indices into {shape}")
    if indices.numel() != budget:
        raise LavaConfigError(
            f"masks[{name!r}] selects {indices.numel()} entries but the budget of {name} is {budget}; set "
            f"budget_pattern={{'{name}': {indices.numel()}}} or change the mask"
        )
    return indices.cpu()


def shira_indices(spec: LayerSpec, config: ShiraConfig, module_name: str, budget: int) -> torch.Tensor | None:
    """The sorted flat indices of this layer's mask (``budget`` of them), or ``None`` when they are to be
    loaded from a file."""
    given = config.mask_for(module_name)
    if given is not None:
        return _indices_from_given(given, spec, budget, config.mask_slot, module_name)
    if config.masks == SAVED_MASKS:
        return None
    builder = mask_builder(config.mask_type)
    if builder.needs:
        raise LavaConfigError(
            f"mask_type={config.mask_type!r} needs the model's {' and '.join(builder.needs)}; build the masks first: "
            "config = lava_peft.methods.shira.with_masks(model, config"
            + (", batches=..., loss_fn=...)" if "grad" in builder.needs else ")")
            + ", then add_adapter(name, config)"
        )
    scores = builder.scores(MaskInputs(spec.canonical_shape, budget, config.seed))
    return select_top(scores, budget, config.mask_slot)


class ShiraAdapter(SparseDeltaAdapter):
    """SHiRA on one layer: the mask comes from the config (see :func:`shira_indices`)."""

    def __init__(self, spec: LayerSpec, config: ShiraConfig, module_name: str):
        budget = shira_budget(spec, config, module_name)
        super().__init__(spec, config, module_name, shira_indices(spec, config, module_name, budget), budget)

    @classmethod
    def check_layer(cls, spec: LayerSpec, config: ShiraConfig, module_name: str) -> None:
        budget = shira_budget(spec, config, module_name)
        numel = math.prod(spec.canonical_shape)
        needed = (config.mask_slot + 1) * budget
        if needed > numel and config.mask_for(module_name) is None and config.masks != SAVED_MASKS:
            raise LavaConfigError(
                f"{config.label} mask_slot={config.mask_slot} on {module_name} needs {needed} entries "
                f"((slot+1)·budget) but the weight {spec.canonical_shape} has {numel}; lower mask_slot or the budget"
            )


# =============================================================================== masks from the model
def with_masks(model: nn.Module, config: ShiraConfig, batches=None, loss_fn=None) -> ShiraConfig:
    """``config`` with ``masks`` filled for every layer it targets, from the model's current weights.

    ``random``/``struct`` need nothing; ``weight_magnitude`` reads ``W``; ``grad``/``snip``
    accumulate ``|∇W|`` over ``batches`` with ``loss_fn(model, batch) -> loss``
    (:func:`~lava_peft.methods.sparse_masks.calibration_gradients`; the model is left as it
    was).  ``model`` is the base model or an :class:`~lava_peft.AdaptedModel` (then the
    base weights of adapted layers are used, as they are — merged adapters included).
    The result is passed to ``adapt``/``add_adapter`` unchanged.
    """
    config.validate()
    builder = mask_builder(config.mask_type)
    layers = mask_layers(model, config)
    grads = {}
    if "grad" in builder.needs:
        if batches is None or loss_fn is None:
            raise LavaConfigError(
                f"mask_type={config.mask_type!r} needs calibration gradients: pass batches=<iterable of batches> "
                "and loss_fn=<callable(model, batch) -> loss>"
            )
        grads = calibration_gradients(model, batches, loss_fn, {path: base.weight for path, base, *_ in layers})
    scores = layer_scores(layers, config, grad=grads)
    masks = {path: select_top(scores[path], budget, config.mask_slot).cpu() for path, *_, budget in layers}
    return dataclasses.replace(config, masks=masks)


def mask_layers(model: nn.Module, config: ShiraConfig) -> list[tuple[str, nn.Module, Any, LayerSpec, int]]:
    """``(path, base layer, layer ops, spec, budget)`` of every layer ``config`` targets, each checked
    (budget and mask slot fit).  ``model`` is the base model or an :class:`~lava_peft.AdaptedModel`
    (then the base layers of adapted layers)."""
    from ..inject import find_targets
    from ..layers import AdaptedLayer, layer_ops
    from ..model import AdaptedModel

    root = model.model if isinstance(model, AdaptedModel) else model
    layers = []
    for path, found in find_targets(root, config):
        base = found.base_layer if isinstance(found, AdaptedLayer) else found
        ops = layer_ops(base)
        spec = ops.spec(base)
        ShiraAdapter.check_layer(spec, config, path)
        layers.append((path, base, ops, spec, shira_budget(spec, config, path)))
    return layers


def layer_scores(layers, config: ShiraConfig, **per_layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{path: scores}`` of the builder ``config.mask_type`` for :func:`mask_layers`' layers (canonical layout).

    ``per_layer`` gives further :class:`~lava_peft.methods.sparse_masks.MaskInputs` fields as
    ``{path: tensor}`` in the weight's own layout (``grad=``, ``weight_change=``); the weight
    itself is read when the builder needs it.
    """
    builder = mask_builder(config.mask_type)
    out = {}
    for path, base, ops, spec, budget in layers:
        # the layer maps are transposes (their own inverses): to_base_layout also maps base -> canonical
        extra = {name: ops.to_base_layout(values[path]) for name, values in per_layer.items() if path in values}
        weight = ops.to_base_layout(base.weight.detach()).float() if "weight" in builder.needs else None
        out[path] = builder.scores(MaskInputs(spec.canonical_shape, budget, config.seed, weight=weight, **extra))
    return out


# =============================================================================== combination
class ShiraSparseCodec:
    """Builds the exact ``"linear"`` combination of SHiRA adapters as a SHiRA adapter (see ``combine.py``)."""

    def result_config(self, input_configs: list[ShiraConfig], supports: dict[str, torch.Tensor]) -> ShiraConfig:
        """A SHiRA config (``α = 1``) whose mask on each layer is exactly ``supports[path]``."""
        first = next(c for c in input_configs if isinstance(c, ShiraConfig))
        saved = []
        for cfg in input_configs:
            saved.extend(s for s in cfg.modules_to_save or [] if s not in saved)
        return ShiraConfig(
            target_modules="(?:" + "|".join(re.escape(p) for p in supports) + ")",
            modules_to_save=saved or None,
            r=first.r,
            alpha=1.0,
            budget_pattern={f"^{re.escape(p)}$": int(s.numel()) for p, s in supports.items()},
            mask_type=first.mask_type,
            seed=first.seed,
            masks={p: s for p, s in supports.items()},
        )

    def write(self, adapter: SparseDeltaAdapter, values: torch.Tensor) -> None:
        """Set the adapter's values so that ``scale·v = values`` (its indices are the support)."""
        adapter.sparse_values.copy_(values / adapter.scale)


# =============================================================================== HF PEFT export
def export_peft_shira(model, save_directory: str, adapter_name: str | None = None,
                      base_model_name_or_path: str | None = None) -> None:
    """Write SHiRA adapter ``adapter_name`` as a HF PEFT (0.21) SHiRA directory.

    PEFT stores per module ``base_model.model.<path>.shira_weight`` (the values, scale 1) and
    ``shira_indices`` (``(2, nnz)`` int32 rows/columns, row-major — our sorted flat indices
    unravelled); ``α`` is folded into the values.  PEFT sizes every layer as ``r·(m + n)``
    with one ``r`` and adapts only ``nn.Linear``, so other layers, per-module budgets and
    ``modules_to_save`` are refused (before anything is written).
    """
    from ..inject import adapted_layers
    from ..io import CONFIG_NAME, WEIGHTS_NAME, atomic_save_safetensors, atomic_write_json
    from ..layers import LinearOps

    name = adapter_name or model.active_adapter
    model._check_known(name)
    config = model.peft_config[name]
    if config.method != "shira":
        raise LavaConfigError(f"adapter {name!r} is a {config.method!r} adapter; export_peft_shira exports SHiRA only")
    if config.modules_to_save:
        raise LavaConfigError(f"adapter {name!r} has modules_to_save {config.modules_to_save}; the PEFT SHiRA export "
                              "does not carry them")
    tensors, ranks = {}, {}
    for path, layer in adapted_layers(model.model):
        if name not in layer.adapters:
            continue
        if type(layer.ops) is not LinearOps or type(layer.base_layer) is not nn.Linear:
            raise LavaConfigError(f"{path} is a {type(layer.base_layer).__name__}; PEFT SHiRA adapts nn.Linear only")
        adapter = layer.adapters[name]
        indices, values = adapter.sparse_delta()
        per_rank = layer.spec.out_dim + layer.spec.in_dim
        if indices.numel() % per_rank:
            raise LavaConfigError(f"{path} has {indices.numel()} entries, not r·(O + I) = r·{per_rank}; PEFT SHiRA "
                                  "sizes every layer by r")
        ranks[path] = indices.numel() // per_rank
        flat = indices.long().cpu()
        rows, cols = flat // layer.spec.in_dim, flat % layer.spec.in_dim
        tensors[f"base_model.model.{path}.shira_weight"] = values.detach().float().cpu()
        tensors[f"base_model.model.{path}.shira_indices"] = torch.stack([rows, cols]).to(torch.int32)
    if len(set(ranks.values())) != 1:
        raise LavaConfigError(f"adapter {name!r} has per-layer budgets (r = {sorted(set(ranks.values()))}); PEFT "
                              "SHiRA has one r for every layer")
    peft_config = {
        "peft_type": "SHIRA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": next(iter(ranks.values())),
        "mask_type": "random",  # PEFT builds a random mask, then loads the saved indices over it
        "random_seed": config.seed,
        "target_modules": "(?:" + "|".join(re.escape(p) for p in ranks) + ")",
        "fan_in_fan_out": False,
        "init_weights": True,
        "modules_to_save": None,
    }
    out = Path(save_directory)
    atomic_save_safetensors(tensors, out / WEIGHTS_NAME, {"format": "pt"})
    atomic_write_json(out / CONFIG_NAME, peft_config)


def import_peft_shira(model, directory: Path, peft_config: dict, tensors: dict[str, torch.Tensor],
                      adapter_name: str = "default", is_trainable: bool = False):
    """Load a HF PEFT SHiRA directory (``peft_type: "SHIRA"``) as a SHiRA adapter; the inverse of
    :func:`export_peft_shira`.  Called by :func:`lava_peft.interop.import_peft`.

    Per module, PEFT's ``shira_indices`` ``(2, nnz)`` (row, column) pairs become our sorted flat
    indices ``row·I + col`` and ``shira_weight`` the values, permuted the same way (scale 1).
    Everything is checked — keys, shapes, index range and uniqueness, that every module is an
    ``nn.Linear`` of the base model — before the model changes.
    """
    from ..interop import base_layer_at
    from ..io import WEIGHTS_NAME
    from ..model import AdaptedModel

    wrapped = model if isinstance(model, AdaptedModel) else AdaptedModel(model)
    base = wrapped.model
    weights_path = Path(directory) / WEIGHTS_NAME
    if peft_config.get("modules_to_save"):
        raise AdapterFileError(f"{directory}: PEFT SHiRA modules_to_save {peft_config['modules_to_save']} are not "
                               "supported by import_peft")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(shira_weight|shira_indices)", key)
        if m is None:
            raise AdapterFileError(f"{weights_path}: key {key!r} is not a PEFT SHiRA tensor")
        parts.setdefault(m.group(1), {})[m.group(2)] = value
    if not parts:
        raise AdapterFileError(f"{weights_path} contains no SHiRA tensors")
    masks, values, problems = {}, {}, []
    for path, pair in parts.items():
        if set(pair) != {"shira_weight", "shira_indices"}:
            raise AdapterFileError(f"{weights_path}: {path} has {sorted(pair)}, expected shira_weight and shira_indices")
        layer = base_layer_at(base, path, problems)
        if layer is None:
            continue
        if type(layer) is not nn.Linear:
            problems.append(f"{path}: {type(layer).__name__}, PEFT SHiRA adapts nn.Linear only")
            continue
        idx, weight = pair["shira_indices"], pair["shira_weight"]
        out_dim, in_dim = layer.weight.shape
        if idx.dim() != 2 or idx.shape[0] != 2 or weight.shape != (idx.shape[1],) or idx.is_floating_point():
            raise AdapterFileError(f"{weights_path}: {path} indices {tuple(idx.shape)} / values {tuple(weight.shape)} "
                                   "are not (2, nnz) / (nnz,)")
        rows, cols = idx[0].long(), idx[1].long()
        if idx.numel() and (rows.min() < 0 or cols.min() < 0 or rows.max() >= out_dim or cols.max() >= in_dim):
            raise AdapterFileError(f"{weights_path}: {path} indices fall outside the weight {out_dim}x{in_dim}")
        flat = rows * in_dim + cols
        order = torch.argsort(flat)
        flat = flat[order]
        if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
            raise AdapterFileError(f"{weights_path}: {path} has repeated (row, column) pairs")
        masks[path], values[path] = flat, weight.float()[order]
    if problems:
        from ..errors import IncompatibleBaseModelError

        raise IncompatibleBaseModelError(f"the PEFT SHiRA adapter in {directory} does not fit this base model: "
                                         f"{'; '.join(problems[:5])}")
    config = ShiraConfig(
        target_modules="(?:" + "|".join(re.escape(p) for p in masks) + ")",
        r=int(peft_config.get("r", 32)), alpha=1.0, seed=int(peft_config.get("random_seed") or 0),
        budget_pattern={f"^{re.escape(p)}$": int(m.numel()) for p, m in masks.items()},
        masks=masks,
    )
    plan = wrapped._plan(adapter_name, config, target_names=list(masks))
    with torch.no_grad():
        for path, _, adapter in plan.layers:
            adapter.sparse_values.copy_(values[path])
    if not is_trainable:
        wrapped._inference_only.add(adapter_name)
    wrapped._commit(plan)
    wrapped.set_adapter(adapter_name)
    if not is_trainable:
        wrapped.eval()
    return wrapped


def _register() -> None:
    register_method("shira", ShiraConfig, ShiraAdapter)
    from ..combine import register_sparse_codec

    register_sparse_codec("shira", ShiraSparseCodec())


_register()

__all__ = ["SAVED_MASKS", "ShiraAdapter", "ShiraConfig", "SparseDeltaAdapter", "export_peft_shira", "layer_scores",
           "mask_layers", "shira_budget", "shira_indices", "with_masks"]
