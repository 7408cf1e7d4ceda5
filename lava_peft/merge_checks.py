"""Checks run before any adapter is merged into base weights (nothing is changed when one fails)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .errors import LavaError
from .inject import adapted_layers
from .layers import all_finite
from .module_layers import ModuleAdapterHost
from .quant import is_quantized_linear


def check_mergeable(model: nn.Module, names: Sequence[str], layers: Sequence[tuple[str, nn.Module]] | None = None) -> None:
    """Refuse non-finite increments, and weights tied to another module (e.g. GPT-2's ``wte`` and
    ``lm_head``: merging into one would change both), before any weight is modified.

    ``layers``: the model's ``adapted_layers`` when the caller has them.  The finiteness of every
    increment is checked by one ``isfinite`` over all of them (per device and dtype); only when that
    fails are they checked one by one, to name the adapter."""
    owners: dict[int, list[str]] = {}
    for p_name, p in model.named_parameters(remove_duplicate=False):
        if ".adapters." not in p_name and ".copies." not in p_name:
            owners.setdefault(id(p), []).append(p_name)
    to_check = []
    for path, layer in adapted_layers(model) if layers is None else layers:
        todo = [n for n in names if n in layer.adapters and n not in layer.merged_adapters]
        if not todo:
            continue
        if isinstance(layer, ModuleAdapterHost):
            raise LavaError(f"cannot merge {todo} at {path}: {layer.merge_refusal(todo)}")
        if is_quantized_linear(layer.base_layer):
            raise LavaError(
                f"{path} has a quantized base weight; merging {todo} into it would corrupt it. Keep the "
                "adapter unmerged, or merge into a full-precision copy of the base model"
            )
        tied = [o for o in owners.get(id(layer.base_weight), []) if not o.startswith(f"{path}.base_layer.")]
        if tied:
            raise LavaError(
                f"the weight of {path} is tied to {tied}; merging {todo} would change those too. Keep the "
                "adapter unmerged, or untie the weights first (e.g. clone lm_head.weight)"
            )
        to_check += [(layer, n) for n in todo]
    _check_all_finite(to_check)


def _check_all_finite(pairs: list) -> None:
    groups: dict = {}
    for layer, name in pairs:
        for t in layer.finiteness_tensors(name):
            groups.setdefault((t.device, t.dtype), []).append(t.detach().reshape(-1))
    if all(all_finite(torch.cat(ts)) for ts in groups.values()):
        return
    for layer, name in pairs:
        layer._check_finite(name)  # raises, naming the adapter


__all__ = ["check_mergeable"]
