"""LT-SFT on a whole model: phase 1 (dense training of the targeted weights) and the lottery-ticket mask.

The sparse adapter trained in phase 2 is :mod:`lava_peft.methods.sft`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import LavaConfigError, LavaError
from ..inject import find_modules_to_save
from ..layers import SavedModuleWrapper
from ..methods.sft import SCOPES, SftConfig
from ..methods.sparse_masks import mask_builder, select_top
from ..model import AdaptedModel
from ..train import Trainer, TrainingArguments
from .shira import layer_scores, mask_layers
from .sparse_masks import weight_changes


def lottery_ticket_masks(model: nn.Module, config: SftConfig, train_fn: Callable[[nn.Module], Any], *,
                         scope: str = "global", l1_lambda: float = 0.0, exclude: dict[str, torch.Tensor] | None = None,
                         budget: int | None = None) -> dict[str, torch.Tensor]:
    """Phase 1 and the selection of LT-SFT: ``{module path: sorted flat indices}`` for ``SftConfig(masks=...)``.

    ``train_fn(model)`` trains the weights of the layers ``config`` targets densely
    (``θ0 → θ1``; the ``modules_to_save`` of ``config``, e.g. a new head, are trained too,
    all else is frozen); then every parameter, buffer, ``requires_grad``, ``.grad`` and
    train/eval mode of ``model`` is restored exactly — also when ``train_fn`` raises
    (:func:`~lava_peft.tools.sparse_masks.weight_changes`).  The mask keeps the entries
    with the highest ``config.mask_type`` scores (``"weight_change"``: ``|θ1 − θ0|`` in the
    canonical layout; ties go to the lower flat index):

    * ``scope="layer"``: the top ``budget`` of each weight (SHiRA's budget rule,
      ``config.mask_slot`` applies);
    * ``scope="global"`` (default, composable-sft's choice): the top ``Σ budget`` over all
      targeted weights together, so a layer that changed more gets more entries (every layer
      must get at least one).

    ``l1_lambda`` adds composable-sft's dense-phase L1 pull ``λ·Σ|θ − θ0| / N`` (``N``: the
    targeted entries) to phase 1, as its gradient ``(λ/N)·sign(θ − θ0)`` added to every targeted
    weight's gradient in each backward of ``train_fn`` (so it works with any training loop; a
    logged loss does not include it).  ``exclude`` (``{path: flat indices}``) removes entries
    already selected; ``budget`` overrides the number of entries to select (``"global"``; with
    ``"layer"`` each layer's budget is scaled by ``budget / Σ budget``).  :func:`lt_sft` uses both
    for ``n_ft_iterations`` rounds.

    ``model`` is the base model or an :class:`~lava_peft.AdaptedModel` — then the base
    weights of adapted layers are trained with the active adapters in the forward
    (e.g. a task SFT's phase 1 on top of a language SFT).  Use the result as
    ``config.replace(masks=masks)``; its sizes are the budgets (also for ``"global"``).
    """
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
    weights = {path: base.weight for path, base, *_ in layers}
    if l1_lambda:
        train_fn = _with_l1(train_fn, list(weights.values()), float(l1_lambda))
    changes = weight_changes(model, train_fn, weights, also_train=[p for m in heads for p in m.parameters()])
    unchanged = [path for path, change in changes.items() if not bool(change.any())]
    if unchanged:
        raise LavaError(f"phase 1 left {unchanged[:3]}{' …' if len(unchanged) > 3 else ''} unchanged; train_fn must "
                        "train the targeted weights (build its optimizer inside train_fn, over the parameters that "
                        "require grad; check the lr, the steps and that the loss depends on these layers)")
    scores = layer_scores(layers, config, weight_change=changes)
    for path, taken in (exclude or {}).items():
        flat = scores[path].reshape(-1).clone().float()
        taken = taken.to(flat.device).long()
        if taken.numel():  # already selected: below every other score, never chosen again
            flat[taken] = flat.min() - 1.0
        scores[path] = flat.view(scores[path].shape)
    budgets = {path: b for path, *_, b in layers}
    total = sum(budgets.values())
    if scope == "layer":
        share = 1.0 if budget is None else budget / total
        return {path: select_top(s, max(1, round(budgets[path] * share)), config.mask_slot).cpu()
                for path, s in scores.items()}
    return _global_top(scores, total if budget is None else int(budget), config.mask_slot,
                       allow_empty=exclude is not None)


def _with_l1(train_fn, weights: list[torch.Tensor], l1_lambda: float):
    """``train_fn`` with ``(λ/N)·sign(θ − θ0)`` added to the gradient of every weight (the dense-phase L1)."""
    n = sum(w.numel() for w in weights)

    def wrapped(model):
        starts = [w.detach().clone() for w in weights]
        handles = [w.register_hook(lambda g, w=w, s=s: g + (l1_lambda / n) * torch.sign(w.detach() - s).to(g.dtype))
                   for w, s in zip(weights, starts)]
        try:
            return train_fn(model)
        finally:
            for h in handles:
                h.remove()

    return wrapped


def lt_sft(model: nn.Module, config: SftConfig, dense_train_fn: Callable[[nn.Module], Any],
           sparse_train_fn: Callable[[nn.Module], Any], *, n_ft_iterations: int = 1, adapter_name: str = "default",
           scope: str = "global", l1_lambda: float = 0.0) -> AdaptedModel:
    """LT-SFT as composable-sft's ``LotteryTicketSparseFineTuner.train``: ``n_ft_iterations`` rounds of

    1. dense phase from the current weights ``θ_prev`` (``dense_train_fn``; the SFT found so far is
       active in the forward);
    2. select ``K/n`` more entries — the largest ``|θ − θ0|`` among those not selected yet
       (globally by default; ``θ0`` = the pretrained weights: on unselected entries
       ``θ − θ0`` is the dense phase's change) —, then reset every weight to ``θ_prev``;
    3. sparse phase on the union of the selected entries (``sparse_train_fn``; entries selected
       earlier keep their trained values, new ones start at 0).

    ``K`` = the config's total budget (``density``/``r``); the last round takes the remainder.
    Returns the :class:`~lava_peft.AdaptedModel` (``model`` itself if it is one) with the SFT
    ``adapter_name`` active.  ``l1_lambda``: the dense-phase L1 (:func:`lottery_ticket_masks`).
    """
    if isinstance(n_ft_iterations, bool) or not isinstance(n_ft_iterations, int) or n_ft_iterations < 1:
        raise LavaConfigError(f"n_ft_iterations must be a positive integer (rounds of dense + sparse training); "
                              f"got {n_ft_iterations!r}")
    model = model if isinstance(model, AdaptedModel) else AdaptedModel(model)
    total = sum(b for *_, b in mask_layers(model, config.replace(masks=None)))
    per_round = total // n_ft_iterations
    if per_round < 1:
        raise LavaConfigError(f"{total} entries cannot be split over {n_ft_iterations} rounds; lower n_ft_iterations")
    selected: dict[str, torch.Tensor] | None = None
    values: dict[str, torch.Tensor] = {}
    for it in range(n_ft_iterations):
        k = per_round if it < n_ft_iterations - 1 else total - per_round * (n_ft_iterations - 1)
        new = lottery_ticket_masks(model, config, dense_train_fn, scope=scope, l1_lambda=l1_lambda, exclude=selected,
                                   budget=k)
        union = {p: torch.unique(torch.cat([selected[p], idx]) if selected else idx) for p, idx in new.items()}
        if selected is not None:
            values = {p: a.sparse_values.detach().clone() for p, a in model.adapter_layers(adapter_name)}
            model.delete_adapter(adapter_name)
        plan = model.plan(adapter_name, config.replace(masks=union))
        with torch.no_grad():
            for path, _, adapter in plan.layers:
                if path in values:  # earlier entries keep their values
                    pos = torch.searchsorted(adapter.sparse_indices.long(), selected[path].to(adapter.sparse_indices.device).long())
                    adapter.sparse_values[pos] = values[path].to(adapter.sparse_values.device)
        model.commit(plan)
        model.set_adapter(adapter_name)
        selected = union
        sparse_train_fn(model)
    return model


def _global_top(scores: dict[str, torch.Tensor], budget: int, slot: int,
                allow_empty: bool = False) -> dict[str, torch.Tensor]:
    """The top ``budget`` of all layers' scores together (ties: earlier layer, then lower index), split by layer."""
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])
    chosen = select_top(flat, budget, slot)
    out, start = {}, 0
    for path, s in scores.items():
        lo, hi = torch.searchsorted(chosen, torch.tensor([start, start + s.numel()])).tolist()
        out[path] = chosen[lo:hi] - start
        start += s.numel()
    empty = [path for path, idx in out.items() if idx.numel() == 0]
    if empty and not allow_empty:  # (a later LT-SFT round may add nothing to a layer: it keeps earlier entries)
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
        return Trainer(model, args, train_data, **kwargs).train()

    return train_fn




# =============================================================================== `lava train --method sft`
def prepare_cli_config(config: SftConfig, opts: dict, task) -> SftConfig:
    """``SftConfig.cli_prepare``: phase 1 trains the targeted weights densely, the mask keeps the largest changes."""
    phase1 = TrainingArguments(output_dir=str(Path(opts["out"]) / "sft-phase1"), epochs=opts["sft_phase1_epochs"],
                               batch_size=opts["batch_size"], lr=opts["lr"], seed=opts["seed"], overwrite=True,
                               progress=not opts["no_progress"], summary=False, save_final=False, save_best=False,
                               save_every=0)
    print(f"lava train: LT-SFT phase 1 ({opts['sft_phase1_epochs']} epoch(s) of dense training) ...", flush=True)
    masks = lottery_ticket_masks(task.model, config, trainer_phase(task.train, phase1),
                                 scope=opts.get("sft_scope") or "global")
    return config.replace(masks=masks)


__all__ = ["lottery_ticket_masks", "lt_sft", "prepare_cli_config", "trainer_phase"]
