"""DyLoRA on a whole model: fix the evaluation rank, evaluate across ranks, truncate, save at a rank.

These operate on an :class:`~lava_peft.AdaptedModel` holding a DyLoRA adapter
(:mod:`lava_peft.methods.dylora` defines the adapter itself).  Nothing changes on error.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any, Callable, Iterable

import torch

from ..inject import saved_module_wrappers
from ..interop import export_peft
from ..methods.dylora import DyLoraConfig, RankSampler, _check_rank_value
from ..methods.factorized import factor_parameter
from ._common import adapter_of_method

def _dylora(model, adapter_name: str | None):
    """``(name, config, [(path, adapter)])`` of a DyLoRA adapter of ``model``."""
    return adapter_of_method(model, adapter_name, DyLoraConfig, "rank control")


def _check_model_rank(b, config: DyLoraConfig, layers, what: str) -> None:
    _check_rank_value(b, config.r_min, max(a.r for _, a in layers), what)


def rank_sampler(model, adapter_name: str | None = None) -> RankSampler:
    """The :class:`RankSampler` shared by the layers of a DyLoRA adapter (``.step`` to inspect or resume)."""
    _, _, layers = _dylora(model, adapter_name)
    return layers[0][1]._sampler


def set_rank(model, b: int | None, adapter_name: str | None = None) -> None:
    """Fix the rank ``b`` used outside training (eval forward, merge, ``delta_weight``, save).

    Each layer uses ``min(b, its r)``; ``b=None`` goes back to every layer's full ``r``.  The
    rank is stored as the config's ``eval_rank``, so ``save_pretrained`` keeps it.  A merged
    adapter is re-merged at the new rank.  Training forwards keep drawing ranks.
    Raises :class:`LavaConfigError` (and changes nothing) for a ``b`` outside ``[r_min, r]``.
    """
    name, config, layers = _dylora(model, adapter_name)
    if b is not None:
        _check_model_rank(b, config, layers, "set_rank")
    merged = model.merged_adapters
    if name in merged:
        model.unmerge_adapter()
    for _, adapter in layers:
        adapter.fixed_rank = adapter.r if b is None else min(b, adapter.r)
        adapter._armed = None
    model.peft_config[name] = dataclasses.replace(config, eval_rank=b)
    if name in merged:
        model.merge_adapter(merged)


def eval_across_ranks(model, ranks: Iterable[int], eval_fn: Callable[[Any], Any],
                      adapter_name: str | None = None) -> dict[int, Any]:
    """``{b: eval_fn(model)}`` with the model in eval mode at each fixed rank ``b``.

    Every rank is checked before anything changes; afterwards the fixed rank and each
    module's train/eval mode are restored (also when ``eval_fn`` raises).
    """
    name, config, layers = _dylora(model, adapter_name)
    ranks = list(ranks)
    for b in ranks:
        _check_model_rank(b, config, layers, "eval_across_ranks")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    results: dict[int, Any] = {}
    try:
        for b in ranks:
            set_rank(model, b, name)
            results[b] = eval_fn(model)
    finally:
        set_rank(model, config.eval_rank, name)
        for module, training in modes:
            module.training = training
    return results


def truncate_to_rank(model, b: int, adapter_name: str | None = None, new_name: str | None = None) -> str:
    """Add a plain ``"lora"`` / ``"lava"`` adapter equal to DyLoRA adapter ``adapter_name`` at rank ``b``.

    Per layer of rank ``r``, with ``b' = min(b, r)``: factors ``U[:, :b']``, ``V[:b']``
    (``P_k[:b']`` for LAVA convs) copied, ``r = b'`` and the same ``alpha`` (and
    ``use_rslora``), so its scale ``α/b'`` is DyLoRA's at ``b'`` and its output equals the
    DyLoRA model at rank ``b``.  ``modules_to_save`` copies are copied too.  The new
    adapter (default name ``"<adapter_name>_r<b>"``) is added inactive: ``set_adapter`` it,
    ``save_pretrained(dir, adapter_name=...)`` it, or ``export_peft`` it (LoRA on Linear /
    GPT-2 Conv1D / Embedding / plain convs).  Returns its name; nothing changes on error.
    """
    name, config, layers = _dylora(model, adapter_name)
    _check_model_rank(b, config, layers, "truncate_to_rank")
    new_name = f"{name}_r{b}" if new_name is None else new_name
    paths = [p for p, _ in layers]
    ranks = {p: min(b, a.r) for p, a in layers}
    alphas = {p: a.alpha for p, a in layers}
    common_r = Counter(ranks.values()).most_common(1)[0][0]
    common_alpha = Counter(alphas.values()).most_common(1)[0][0]
    plain = config.plain_config(
        target_modules="(?:" + "|".join(re.escape(p) for p in paths) + ")",
        exclude_modules=None,
        r=common_r,
        alpha=common_alpha,
        rank_pattern={f"^{re.escape(p)}$": r for p, r in ranks.items() if r != common_r},
        alpha_pattern={f"^{re.escape(p)}$": a for p, a in alphas.items() if a != common_alpha},
    )
    plan = model.plan(new_name, plain, target_names=paths)
    source = {p: a for p, a in layers}
    with torch.no_grad():
        for path, _, new in plan.layers:
            old = source[path]
            bl = ranks[path]
            for i, key in enumerate(old.factor_keys()):  # the up factor first: its columns are the components
                src = old.factor(key)
                factor_parameter(new, key).copy_(src[:, :bl] if i == 0 else src[:bl])
    model.commit(plan)
    for _, wrapper in saved_module_wrappers(model.model):
        if name in wrapper.copies and new_name in wrapper.copies:
            wrapper.copies[new_name].load_state_dict(wrapper.copies[name].state_dict())
    return new_name


def save_at_rank(model, b: int, save_directory: str, adapter_name: str | None = None, peft: bool = False,
                 **export_kwargs) -> None:
    """Write DyLoRA adapter ``adapter_name`` at rank ``b`` as a plain lava-peft adapter directory
    (``peft=True``: a HF PEFT LoRA directory via :func:`~lava_peft.interop.export_peft`).

    The model is left as it was (the temporary truncated adapter is deleted)."""
    name, _, _ = _dylora(model, adapter_name)
    tmp = truncate_to_rank(model, b, name, new_name=f"{name}_r{b}_export")
    try:
        if peft:
            export_peft(model, save_directory, adapter_name=tmp, **export_kwargs)
        else:
            model.save_pretrained(save_directory, adapter_name=tmp)
    finally:
        model.delete_adapter(tmp)


__all__ = ["eval_across_ranks", "rank_sampler", "save_at_rank", "set_rank", "truncate_to_rank"]
