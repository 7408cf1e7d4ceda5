"""LT-SFT — Lottery-Ticket Sparse Fine-Tuning (Ansell, Ponti, Korhonen, Vulić; ACL 2022).

A sparse fine-tuning (SFT) changes ``K`` chosen entries of the pretrained weights ``θ0``::

    θ = θ0 + φ,      supp(φ) ⊆ M,      |M| = K

The lottery ticket ``M`` is found by training (:func:`~lava_peft.tools.sft.lottery_ticket_masks`):

1. **phase 1** — fine-tune the targeted weights densely, ``θ0 → θ1`` (a user
   ``train_fn(model)``, or our Trainer through :func:`~lava_peft.tools.sft.trainer_phase`);
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
from typing import Any, ClassVar

import torch

from ..config import register_method
from ..errors import LavaConfigError
from .base import LayerSpec
from .shira import (
    SAVED_MASKS,
    ShiraAdapter,
    ShiraConfig,
    ShiraSparseCodec,
    SparseDeltaAdapter,
    _is_number,
    shira_budget,
    shira_indices,
)
from .sparse_masks import mask_builder

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
            :func:`~lava_peft.tools.sft.lottery_ticket_masks` before adding the adapter.  ``"random"`` and
            ``"struct"`` need no model.
        masks: ``{module: tensor}`` — scores (the top ``budget`` are kept), or an explicit
            bool mask / sorted flat indices, whose size is then the layer's budget.
        l1_lambda: weight of the L1 pull of ``φ`` toward 0 (toward ``θ0``), ``≥ 0``;
            ``model.regularization_loss()`` adds ``l1_lambda · mean over layers of ‖φ_l‖₁``.
    """

    cli_help: ClassVar[str | None] = "LT-SFT: a sparse difference on a lottery-ticket mask from a dense phase 1"
    cli_options: ClassVar[dict[str, tuple]] = {
        "density": ShiraConfig.cli_options["density"],
        "sft_phase1_epochs": (1.0, float, "sft: epochs of dense phase-1 training that pick the lottery-ticket mask"),
        "l1_lambda": (0.0, float, "sft: weight of the L1 pull of the sparse difference toward the pretrained weights"),
        "sft_scope": ("global", str, "sft: global (one threshold over all targeted weights, as composable-sft) | "
                                     "layer (each weight keeps its own budget; use it when a global selection "
                                     "leaves a layer empty)"),
    }
    cli_prepare: ClassVar[str | None] = "lava_peft.tools.sft:prepare_cli_config"

    @classmethod
    def from_cli(cls, opts, common):
        return cls(density=opts["density"] or 0.01, l1_lambda=opts["l1_lambda"], seed=opts["seed"],
                   **dict(common, alpha=opts["alpha"] / 16.0))

    label: ClassVar[str] = "LT-SFT"
    mask_helper: ClassVar[str] = "lava_peft.tools.sft.lottery_ticket_masks(model, config, train_fn)"
    peft_export: ClassVar[str | None] = None  # PEFT has no SFT: not SHiRA's format
    peft_type: ClassVar[str | None] = None
    peft_import: ClassVar[str | None] = None

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
                "first: config = config.replace(masks=lava_peft.tools.sft.lottery_ticket_masks(model, config, "
                "train_fn)), then add the adapter (or use mask_type='random' / 'struct', which need no model)"
            )
        if given is None or given.is_floating_point():
            ShiraAdapter.check_layer(spec, config, module_name)  # the budget and the mask slot fit the weight

    def regularization(self) -> torch.Tensor:
        """``‖φ‖₁ = Σ_j |α·v_j|`` of this layer (unweighted: the config's ``l1_lambda`` weighs it)."""
        self._ready()
        return (self.sparse_values * self.scale).abs().sum()


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
    from .factors import register_sparse_codec

    register_sparse_codec("sft", SftSparseCodec())


_register()

__all__ = ["SCOPES", "SftAdapter", "SftConfig", "SftSparseCodec", "sft_budget"]
