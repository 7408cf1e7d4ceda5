"""Mask builders for sparse weight deltas: which entries of ``W`` a sparse adapter may change.

A mask builder turns what is known about one layer (its canonical shape
``(O, I, K1, …, KN)``, the budget, a seed, optionally the weight and calibration
gradients) into a *score* tensor of the canonical shape.  The mask is the set of the
``budget`` highest scores, ties going to the lower flat index (row-major in the
canonical layout); :func:`select_top` computes it.  Slot ``k`` of a layer is the
``k``-th next budget by score, so adapters with slots ``0, 1, 2, …`` get disjoint masks
(SHiRA's *non-overlapping* multi-adapter variant).

Registered builders (``register_mask(name, fn, needs)`` adds more):

============================  ===========================================  ============
name                          score                                        needs
============================  ===========================================  ============
``"random"``                  rank in ``torch.randperm(numel, seed)``:      —
                              the mask is ``randperm(numel)[:budget]``
                              (HF PEFT's ``random_mask`` with the seed)
``"struct"``                  2 on the diagonal ``W[o, o]`` of the ``O×F``  —
                              flattening (``F = I·ΠK``), 1 on every
                              ``f``-th row, 0 elsewhere (see
                              :func:`struct_scores`)
``"weight_magnitude"``        ``|W|``                                      ``weight``
``"grad"``                    ``Σ_b |∇_W L_b|`` over calibration batches    ``grad``
``"snip"``                    ``|W| ⊙ Σ_b |∇_W L_b|`` (``= Σ_b |W⊙∇W|``)   ``weight``,
                                                                           ``grad``
``"weight_change"``           ``|θ1 − θ0|`` after a dense training phase   ``weight_change``
                              (LT-SFT's lottery ticket)
============================  ===========================================  ============

``weight``, ``grad`` and ``weight_change`` are given in the canonical layout.  The
gradient scores come from :func:`calibration_gradients`, the one calibration utility
shared by every gradient-based mask; the weight changes from :func:`weight_changes`
(``lava_peft.tools.sft.lottery_ticket_masks`` runs it and selects the mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import LavaConfigError, LavaError

_NEEDS = ("weight", "grad", "weight_change")
_HOW_TO_GET = {
    "weight": "lava_peft.tools.shira.with_masks(model, config) reads it",
    "grad": "lava_peft.tools.shira.with_masks(model, config, batches=..., loss_fn=...) computes it",
    "weight_change": "lava_peft.tools.sft.lottery_ticket_masks(model, config, train_fn) computes it",
}


@dataclass(frozen=True)
class MaskInputs:
    """What a mask builder may look at for one layer (tensors in the canonical layout)."""

    shape: tuple[int, ...]
    budget: int
    seed: int = 0
    weight: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    weight_change: torch.Tensor | None = None  # θ1 − θ0 after a dense training phase (LT-SFT)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class MaskBuilder:
    name: str
    fn: Callable[[MaskInputs], torch.Tensor]
    needs: tuple[str, ...] = ()

    def scores(self, inputs: MaskInputs) -> torch.Tensor:
        for need in self.needs:
            if getattr(inputs, need) is None:
                raise LavaConfigError(f"mask {self.name!r} needs the layer's {need}; none was given "
                                      f"({_HOW_TO_GET[need]})")
        return self.fn(inputs)


_MASKS: dict[str, MaskBuilder] = {}


def register_mask(name: str, fn: Callable[[MaskInputs], torch.Tensor], needs: Sequence[str] = ()) -> None:
    """Register ``fn(MaskInputs) -> scores`` (canonical shape, higher = kept first) under ``name``.

    ``needs`` lists what the builder reads besides shape/budget/seed: ``"weight"``,
    ``"grad"`` (calibration gradients) and/or ``"weight_change"`` (``θ1 − θ0`` of a dense
    training phase); builders that need them get their scores from the model before the
    adapter is added (``lava_peft.tools.shira.with_masks``,
    ``lava_peft.tools.sft.lottery_ticket_masks``).
    """
    bad = [n for n in needs if n not in _NEEDS]
    if bad:
        raise LavaConfigError(f"register_mask({name!r}): needs may only contain {list(_NEEDS)}; got {bad}")
    _MASKS[name] = MaskBuilder(name, fn, tuple(needs))


def registered_masks() -> list[str]:
    return sorted(_MASKS)


def mask_builder(name: str) -> MaskBuilder:
    try:
        return _MASKS[name]
    except KeyError:
        raise LavaConfigError(
            f"mask_type={name!r} is unknown; use one of {registered_masks()} or register one with "
            "lava_peft.methods.sparse_masks.register_mask(name, fn)"
        ) from None


# =============================================================================== selection
def _top_set(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``flat``, ties going to the lower index.

    ``torch.topk`` finds the ``k``-th largest value ``t``; every entry ``> t`` is kept and the
    first ``k − #(> t)`` entries equal to ``t`` (in index order).  O(numel), unlike a full sort.
    """
    keep = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if k <= 0:
        return keep
    if k >= flat.numel():
        return keep.fill_(True)
    threshold = torch.topk(flat, k, sorted=False).values.min()
    keep |= flat > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        ties = torch.nonzero(flat == threshold).flatten()[:missing]
        keep[ties] = True
    return keep


def select_top(scores: torch.Tensor, budget: int, slot: int = 0) -> torch.Tensor:
    """Sorted flat indices (int64) of the entries ranked ``[slot·budget, (slot+1)·budget)`` by score.

    Ranking: descending score, ties by ascending flat index (row-major in the canonical
    layout).  Slot 0 is the top ``budget``; slots ``0, 1, …`` are disjoint.
    """
    flat = scores.detach().reshape(-1)
    if flat.is_floating_point() and not bool(torch.isfinite(flat).all()):
        raise LavaError("mask scores contain NaN or inf (did the calibration loss diverge?); fix the scores first")
    stop = (slot + 1) * budget
    if budget <= 0 or stop > flat.numel():
        raise LavaConfigError(
            f"mask slot {slot} with budget {budget} needs {stop} entries but the layer has {flat.numel()}; "
            "lower the budget (r or density) or the slot"
        )
    keep = _top_set(flat, stop)
    if slot:
        keep &= ~_top_set(flat, slot * budget)
    return torch.nonzero(keep).flatten()


def non_overlapping_masks(scores: torch.Tensor, budgets: Sequence[int]) -> list[torch.Tensor]:
    """Successive disjoint masks: adapter ``k`` gets the next ``budgets[k]`` entries by score.

    With equal budgets this is ``[select_top(scores, b, slot=k) for k]``.
    """
    total = sum(budgets)
    flat = scores.detach().reshape(-1)
    if total > flat.numel():
        raise LavaConfigError(f"budgets {list(budgets)} need {total} entries but the layer has {flat.numel()}")
    out, taken = [], torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    start = 0
    for b in budgets:
        keep = _top_set(flat, start + b) & ~taken
        out.append(torch.nonzero(keep).flatten())
        taken |= keep
        start += b
    return out


# =============================================================================== builders
def random_scores(inputs: MaskInputs) -> torch.Tensor:
    """``score[perm[j]] = numel − j`` for ``perm = torch.randperm(numel)`` from a generator seeded
    with ``seed``: the top ``budget`` are ``perm[:budget]`` (HF PEFT's ``random_mask``)."""
    n = inputs.numel
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(inputs.seed)))
    scores = torch.empty(n, dtype=torch.int64)
    scores[perm] = torch.arange(n, 0, -1, dtype=torch.int64)
    return scores.view(inputs.shape)


def struct_scores(inputs: MaskInputs) -> torch.Tensor:
    """SHiRA-Struct on the ``O × F`` flattening (``F = I·ΠK``): the diagonal plus every ``f``-th row.

    With ``d = min(O, F)`` diagonal entries and ``n = ⌈(budget − d) / F⌉`` rows still needed,
    the rows ``o ≡ 0 (mod f)`` with ``f = max(1, ⌊O / n⌋)`` are selected.  Scores: 2 on the
    diagonal ``(o, o)``, 1 on the other entries of selected rows, 0 elsewhere; the top
    ``budget`` (ties → lower index) is the diagonal, then the selected rows in row-major
    order (the last one partly), then — only if those are exhausted — the remaining
    entries in index order.
    """
    out_dim = inputs.shape[0]
    fan = inputs.numel // out_dim
    diag = min(out_dim, fan)
    scores = torch.zeros(out_dim, fan, dtype=torch.int64)
    rows_needed = math.ceil(max(inputs.budget - diag, 0) / fan)
    if rows_needed:
        stride = max(1, out_dim // rows_needed)
        scores[::stride] = 1
    ar = torch.arange(diag)
    scores[ar, ar] = 2
    return scores.view(inputs.shape)


def _weight_magnitude(inputs: MaskInputs) -> torch.Tensor:
    return inputs.weight.abs()


def _grad(inputs: MaskInputs) -> torch.Tensor:
    return inputs.grad.abs()


def _snip(inputs: MaskInputs) -> torch.Tensor:
    return (inputs.weight.float() * inputs.grad.float()).abs()


def _weight_change(inputs: MaskInputs) -> torch.Tensor:
    return inputs.weight_change.float().abs()


register_mask("random", random_scores)
register_mask("struct", struct_scores)
register_mask("weight_magnitude", _weight_magnitude, needs=("weight",))
register_mask("grad", _grad, needs=("grad",))
register_mask("snip", _snip, needs=("weight", "grad"))
register_mask("weight_change", _weight_change, needs=("weight_change",))


__all__ = [
    "MaskBuilder",
    "MaskInputs",
    "mask_builder",
    "non_overlapping_masks",
    "random_scores",
    "register_mask",
    "registered_masks",
    "select_top",
    "struct_scores",
]
