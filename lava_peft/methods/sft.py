"""LT-SFT — Lottery-Ticket Sparse Fine-Tuning (Ansell, Ponti, Korhonen, Vulić; ACL 2022).

A sparse fine-tuning (SFT) changes ``K`` chosen entries of the pretrained weights ``θ0``::

    θ = θ0 + φ,      supp(φ) ⊆ M,      |M| = K

The lottery ticket ``M`` is found by training (:func:`lottery_ticket_masks`):

1. **phase 1** — fine-tune the targeted weights densely, ``θ0 → θ1`` (a user
   ``train_fn(model)``, or our Trainer through :func:`trainer_phase`);
2. **selection** — ``M`` = the entries with the largest ``|θ1 − θ0|`` (the
   ``"weight_change"`` mask builder): per weight (``scope="layer"``: the layer's budget
   ``K_l``) or over all targeted weights together (``scope="global"``: ``K = Σ_l K_l``,
   composable-sft's choice);
3. **reset** — every weight goes back to ``θ0`` bit for bit (also when phase 1 raises);
4. **phase 2** — train only ``φ`` on ``M`` (an :class:`SftAdapter`), optionally pulled
   toward the pretrained weights by an L1 term (``l1_lambda``)::

       loss = task loss + l1_lambda · (1/L) Σ_l ‖φ_l‖₁        (model.regularization_loss())

   over the ``L`` adapted layers.  ``∂/∂φ`` of the term is ``(l1_lambda/L)·sign(φ)`` (0 at
   ``φ = 0``).  composable-sft writes ``λ·Σ|θ − θ0| / N`` with ``N`` the model's
   parameter count: the same term with ``l1_lambda = λ·L/N``.

``φ`` is stored as a :class:`~lava_peft.methods.shira.SparseDeltaAdapter` (SHiRA's sparse
delta): a trainable fp32 value vector ``v`` and a fixed sorted flat-index buffer ``idx``
into the canonical layout, ``φ.reshape(-1)[idx] = α·v``.  Merge/unmerge/switch (scatter into
the weight, never dense), files (indices checked on load), hot-swap and mixed batches are
that class's.

**Budget** per layer, first that applies: an explicit mask in ``masks`` (a bool mask or
flat indices: its size), ``budget_pattern[module]``, ``round(density · numel)`` (default
``density=0.01``, composable-sft's 1 %), else ``r·(O + I·ΠK)`` — SHiRA's conventions
(:func:`~lava_peft.methods.shira.shira_budget`).  ``to_dict`` writes the sizes of explicit
masks into ``budget_pattern``, so a saved adapter reloads with the same budgets.

**Composition by addition**: ``θ0 + φ_language + φ_task``.  Activating both adapters
(``set_adapter(["language", "task"])``) runs ``W0 + φ_lang + φ_task``; merging both adds
both; ``add_weighted_adapter([...], [1, 1], name, combination_type="linear")`` builds one
SFT on the union of the supports (exact, never dense).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..config import register_method
from ..errors import LavaConfigError, LavaError
from ..layers import LayerSpec
from .shira import (
    SAVED_MASKS,
    ShiraAdapter,
    ShiraConfig,
    ShiraSparseCodec,
    SparseDeltaAdapter,
    _is_number,
    layer_scores,
    mask_layers,
    shira_budget,
    shira_indices,
)
from .sparse_masks import mask_builder, select_top, weight_changes

SCOPES = ("layer", "global")


# =============================================================================== config
@dataclass
class SftConfig(ShiraConfig):
    """LT-SFT: train a sparse difference ``φ`` on a lottery-ticket mask (see the module docstring).

    Every SHiRA field keeps its meaning (``r``/``density``/``budget_pattern`` budgets,
    ``alpha`` = ``α`` in ``φ = α·v``, ``mask_slot``, ``seed``, ``masks``); the differences:

    Args:
        density: default 0.01 (1 % of each targeted weight); ``None`` uses ``r·(O + I·ΠK)``.
        mask_type: default ``"weight_change"``: build ``masks`` with
            :func:`lottery_ticket_masks` before adding the adapter.  ``"random"`` and
            ``"struct"`` need no model.
        masks: ``{module: tensor}`` — scores (the top ``budget`` are kept), or an explicit
            bool mask / sorted flat indices, whose size is then the layer's budget.
        l1_lambda: weight of the L1 pull of ``φ`` toward 0 (toward ``θ0``), ``≥ 0``;
            ``model.regularization_loss()`` adds ``l1_lambda · mean over layers of ‖φ_l‖₁``.
    """

    label: ClassVar[str] = "LT-SFT"
    mask_helper: ClassVar[str] = "lava_peft.methods.sft.lottery_ticket_masks(model, config, train_fn)"

    density: float | None = 0.01
    mask_type: str = "weight_change"
    l1_lambda: float = 0.0

    def validate(self) -> None:
        super().validate()
        if not _is_number(self.l1_lambda) or not math.isfinite(self.l1_lambda) or self.l1_lambda < 0:
            raise LavaConfigError(f"SftConfig.l1_lambda must be a finite number >= 0 (0: no L1 term); "
                                  f"got {self.l1_lambda!r}")

    def regularization_weight(self) -> float:
        """``l1_lambda``: the weight of the adapters' ``‖φ‖₁`` (see :meth:`SftAdapter.regularization`)."""
        return float(self.l1_lambda)

    def explicit_mask_sizes(self) -> dict[str, int]:
        """``{key of masks: entries}`` for the masks given as a bool mask or flat indices."""
        if not isinstance(self.masks, dict):
            return {}
        return {k: _mask_size(m) for k, m in self.masks.items() if not m.is_floating_point()}

    def to_dict(self) -> dict[str, Any]:
        """JSON form; the sizes of explicit masks go into ``budget_pattern`` (the file holds the indices)."""
        data = super().to_dict()
        sizes = self.explicit_mask_sizes()
        data["budget_pattern"] = {**sizes, **{k: v for k, v in self.budget_pattern.items() if k not in sizes}}
        return data


def _mask_size(mask: torch.Tensor) -> int:
    return int(mask.sum()) if mask.dtype == torch.bool else mask.numel()


def sft_budget(spec: LayerSpec, config: SftConfig, module_name: str) -> int:
    """Entries of this layer: the size of an explicit mask, else SHiRA's rule (:func:`shira_budget`)."""
    given = config.mask_for(module_name)
    if given is not None and not given.is_floating_point():
        return _mask_size(given)
    return shira_budget(spec, config, module_name)


# =============================================================================== adapter
class SftAdapter(SparseDeltaAdapter):
    """A sparse fine-tuning ``φ`` of one layer (values at the mask's flat indices) with an L1 term."""

    def __init__(self, spec: LayerSpec, config: SftConfig, module_name: str):
        budget = sft_budget(spec, config, module_name)
        super().__init__(spec, config, module_name, shira_indices(spec, config, module_name, budget), budget)

    @classmethod
    def check_layer(cls, spec: LayerSpec, config: SftConfig, module_name: str) -> None:
        given = config.mask_for(module_name)
        if given is None and config.masks != SAVED_MASKS and mask_builder(config.mask_type).needs:
            raise LavaConfigError(
                f"SftConfig(mask_type={config.mask_type!r}) has no mask for {module_name}; run the dense phase "
                "first: config = config.replace(masks=lava_peft.methods.sft.lottery_ticket_masks(model, config, "
                "train_fn)), then add the adapter (or use mask_type='random' / 'struct', which need no model)"
            )
        if given is None or given.is_floating_point():
            ShiraAdapter.check_layer(spec, config, module_name)  # the budget and the mask slot fit the weight

    def regularization(self) -> torch.Tensor:
        """``‖φ‖₁ = Σ_j |α·v_j|`` of this layer (unweighted: the config's ``l1_lambda`` weighs it)."""
        self._ready()
        return (self.sparse_values * self.scale).abs().sum()


# =============================================================================== the lottery ticket
def lottery_ticket_masks(model: nn.Module, config: SftConfig, train_fn: Callable[[nn.Module], Any], *,
                         scope: str = "layer") -> dict[str, torch.Tensor]:
    """Phase 1 and the selection of LT-SFT: ``{module path: sorted flat indices}`` for ``SftConfig(masks=...)``.

    ``train_fn(model)`` trains the weights of the layers ``config`` targets densely
    (``θ0 → θ1``; the ``modules_to_save`` of ``config``, e.g. a new head, are trained too,
    all else is frozen); then every parameter, buffer, ``requires_grad``, ``.grad`` and
    train/eval mode of ``model`` is restored exactly — also when ``train_fn`` raises
    (:func:`~lava_peft.methods.sparse_masks.weight_changes`).  The mask keeps the entries
    with the highest ``config.mask_type`` scores (``"weight_change"``: ``|θ1 − θ0|`` in the
    canonical layout; ties go to the lower flat index):

    * ``scope="layer"``: the top ``budget`` of each weight (SHiRA's budget rule,
      ``config.mask_slot`` applies);
    * ``scope="global"``: the top ``Σ budget`` over all targeted weights together, so a
      layer that changed more gets more entries (every layer must get at least one).

    ``model`` is the base model or an :class:`~lava_peft.AdaptedModel` — then the base
    weights of adapted layers are trained with the active adapters in the forward
    (e.g. a task SFT's phase 1 on top of a language SFT).  Use the result as
    ``config.replace(masks=masks)``; its sizes are the budgets (also for ``"global"``).
    """
    from ..inject import find_modules_to_save
    from ..layers import SavedModuleWrapper
    from ..model import AdaptedModel

    if scope not in SCOPES:
        raise LavaConfigError(f"scope must be one of {SCOPES} (top entries per weight or over all weights); "
                              f"got {scope!r}")
    config = config.replace(masks=None)
    if "weight_change" not in mask_builder(config.mask_type).needs:
        raise LavaConfigError(f"lottery_ticket_masks ranks entries by their change in phase 1, but mask_type="
                              f"{config.mask_type!r} does not read it; use mask_type='weight_change' (or a builder "
                              "registered with needs=('weight_change', ...))")
    layers = mask_layers(model, config)
    root = model.model if isinstance(model, AdaptedModel) else model
    heads = [m.current() if isinstance(m, SavedModuleWrapper) else m
             for _, m in find_modules_to_save(root, config.modules_to_save)]
    changes = weight_changes(model, train_fn, {path: base.weight for path, base, *_ in layers},
                             also_train=[p for m in heads for p in m.parameters()])
    unchanged = [path for path, change in changes.items() if not bool(change.any())]
    if unchanged:
        raise LavaError(f"phase 1 left {unchanged[:3]}{' …' if len(unchanged) > 3 else ''} unchanged; train_fn must "
                        "train the targeted weights (build its optimizer inside train_fn, over the parameters that "
                        "require grad; check the lr, the steps and that the loss depends on these layers)")
    scores = layer_scores(layers, config, weight_change=changes)
    budgets = {path: budget for path, *_, budget in layers}
    if scope == "layer":
        return {path: select_top(s, budgets[path], config.mask_slot).cpu() for path, s in scores.items()}
    return _global_top(scores, sum(budgets.values()), config.mask_slot)


def _global_top(scores: dict[str, torch.Tensor], budget: int, slot: int) -> dict[str, torch.Tensor]:
    """The top ``budget`` of all layers' scores together (ties: earlier layer, then lower index), split by layer."""
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])
    chosen = select_top(flat, budget, slot)
    out, start = {}, 0
    for path, s in scores.items():
        lo, hi = torch.searchsorted(chosen, torch.tensor([start, start + s.numel()])).tolist()
        out[path] = chosen[lo:hi] - start
        start += s.numel()
    empty = [path for path, idx in out.items() if idx.numel() == 0]
    if empty:
        raise LavaConfigError(f"the global selection of {budget} entries leaves none in {empty[:3]}; raise density "
                              "(or r), use scope='layer', or leave these layers out of target_modules")
    return out


def trainer_phase(train_data: Any, args=None, **kwargs) -> Callable[[nn.Module], dict]:
    """A ``train_fn`` for :func:`lottery_ticket_masks` that runs our :class:`~lava_peft.train.Trainer`.

    ``train_fn(model)`` builds ``Trainer(model, args, train_data, **kwargs)`` — inside, so its
    optimizer covers the phase-1 weights — and returns ``trainer.train()``'s summary.
    Without ``args`` the phase writes no adapter/checkpoint files (``save_final=False``,
    ``save_best=False``, ``save_every=0``) unless ``kwargs`` say otherwise.
    """
    if args is None:
        kwargs = {"save_final": False, "save_best": False, "save_every": 0, **kwargs}

    def train_fn(model: nn.Module) -> dict:
        from ..train import Trainer

        return Trainer(model, args, train_data, **kwargs).train()

    return train_fn


# =============================================================================== combination
class SftSparseCodec(ShiraSparseCodec):
    """The exact ``"linear"`` combination of SFTs (``θ0 + Σ w_a φ_a``) as one SFT on the union of the supports."""

    def result_config(self, input_configs: list[SftConfig], supports: dict[str, torch.Tensor]) -> SftConfig:
        shira = super().result_config(input_configs, supports)
        first = next(c for c in input_configs if isinstance(c, SftConfig))
        fields = {f.name: getattr(shira, f.name) for f in dataclasses.fields(ShiraConfig)}
        return SftConfig(**fields, l1_lambda=first.l1_lambda)


def _register() -> None:
    register_method("sft", SftConfig, SftAdapter)
    from ..combine import register_sparse_codec

    register_sparse_codec("sft", SftSparseCodec())


_register()

__all__ = ["SCOPES", "SftAdapter", "SftConfig", "SftSparseCodec", "lottery_ticket_masks", "sft_budget",
           "trainer_phase"]
