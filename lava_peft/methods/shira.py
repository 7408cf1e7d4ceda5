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
  first with :func:`lava_peft.tools.shira.with_masks` (calibration batches for ``grad``/``snip``), which fills
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

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..config import AdapterConfig, _pattern_lookup, register_method
from ..errors import LavaConfigError
from .base import LayerSpec
from .sparse import SparseDeltaAdapter, index_problem
from .sparse_masks import MaskInputs, mask_builder, select_top

SAVED_MASKS = "saved"
"""``ShiraConfig.masks`` of a config read from a file: the indices are in the adapter file."""



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
            ``budget`` entries.  :func:`~lava_peft.tools.shira.with_masks` fills it.  Not written to JSON; a config
            read from a file has ``masks="saved"`` (the indices come from the adapter file).
    """

    cli_help: ClassVar[str | None] = "SHiRA: a fixed sparse subset of each weight's entries"
    cli_options: ClassVar[dict[str, tuple]] = {
        "density": (None, float, "shira/sft: fraction of each targeted weight that is trained (default: "
                                 "shira r·(O+I) entries, sft 0.01)"),
        "mask": (None, str, "shira: mask type random | struct | weight_magnitude | grad | snip (default random)"),
    }
    cli_notes: ClassVar[dict[str, str]] = {
        "rank": "a budget of r·(O+I) entries per layer unless --density is given",
        "alpha": "alpha/16 is used as the plain scale of the sparse values",
        "lr": "they update weight entries directly; chosen on a validation split, benchmarks/results/methods.md",
    }
    cli_default_lr: ClassVar[float] = 2e-2
    cli_prepare: ClassVar[str | None] = "lava_peft.tools.shira:prepare_cli_config"

    @classmethod
    def from_cli(cls, opts, common):
        return cls(density=opts["density"], mask_type=opts["mask"] or "random", seed=opts["seed"],
                   **dict(common, alpha=opts["alpha"] / 16.0))

    label: ClassVar[str] = "SHiRA"
    """The method's name in error messages (subclasses such as LT-SFT set their own)."""
    mask_helper: ClassVar[str] = "lava_peft.tools.shira.with_masks(model, config, ...)"
    """How to build ``masks`` from a model, named in error messages."""
    peft_export: ClassVar[str | None] = "lava_peft.tools.shira:export_peft_shira"
    peft_type: ClassVar[str | None] = "SHIRA"
    peft_import: ClassVar[str | None] = "lava_peft.tools.shira:import_peft_shira"

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
            "config = lava_peft.tools.shira.with_masks(model, config"
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


def _register() -> None:
    register_method("shira", ShiraConfig, ShiraAdapter)
    from .factors import register_sparse_codec

    register_sparse_codec("shira", ShiraSparseCodec())


_register()

__all__ = ["SAVED_MASKS", "ShiraAdapter", "ShiraConfig", "SparseDeltaAdapter", "shira_budget", "shira_indices"]
