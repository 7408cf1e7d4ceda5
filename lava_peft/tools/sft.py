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
                         scope: str = "layer") -> dict[str, torch.Tensor]:
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
    * ``scope="global"``: the top ``Σ budget`` over all targeted weights together, so a
      layer that changed more gets more entries (every layer must get at least one).

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
    masks = lottery_ticket_masks(task.model, config, trainer_phase(task.train, phase1))
    return config.replace(masks=masks)


__all__ = ["lottery_ticket_masks", "prepare_cli_config", "trainer_phase"]
