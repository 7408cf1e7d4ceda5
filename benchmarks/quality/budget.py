"""Trainable-parameter counts per method, and the LAVA rank that matches a LoRA budget."""

from __future__ import annotations

import math

from torch import nn

from lava_peft.inject import find_targets
from lava_peft.layers import layer_ops
from lava_peft.methods.lava import LavaAdapter


def _specs(model: nn.Module, config) -> list[tuple[str, object]]:
    return [(name, layer_ops(m).spec(m)) for name, m in find_targets(model, config)]


def lora_params(spec, r: int) -> int:
    return min(r, lora_rank_limit(spec)) * (spec.in_dim * math.prod(spec.kernel_size) + spec.out_dim)


def lora_rank_limit(spec) -> int:
    """The largest useful LoRA rank of a layer: ``min(O, I·ΠK)``."""
    return min(spec.out_dim, spec.in_dim * math.prod(spec.kernel_size))


def lava_params(spec, r: int) -> int:
    return min(r, LavaAdapter.max_rank_for(spec)) * (spec.out_dim + spec.in_dim + sum(spec.kernel_size))


def rank_caps(specs, r: int, limit_fn) -> dict[str, int]:
    """``rank_pattern`` entries for layers whose rank limit is below ``r`` (exact module names)."""
    return {name: limit_fn(spec) for name, spec in specs if limit_fn(spec) < r}


def lava_rank_caps(model, config, r: int) -> dict[str, int]:
    """``rank_pattern`` entries that keep LAVA rank ``r`` within each targeted layer's limit."""
    return rank_caps(_specs(model, config), r, LavaAdapter.max_rank_for)


def lora_budget(model, config) -> int:
    return sum(lora_params(s, config.r) for _, s in _specs(model, config))


def matching_rank(specs, count_fn, budget: int, r_max: int = 512) -> tuple[int, int]:
    """``(r, count)``: the rank whose total ``Σ count_fn(spec, r)`` over ``specs`` is closest to ``budget``."""
    best = None
    for r in range(1, r_max + 1):
        n = sum(count_fn(s, r) for _, s in specs)
        if best is None or abs(n - budget) < abs(best[1] - budget):
            best = (r, n)
        if n > budget * 1.5:
            break
    return best


def matching_lava_rank(model, config, budget: int, r_max: int = 512) -> tuple[int, int]:
    """The LAVA rank whose adapter parameter count is closest to ``budget`` (ranks capped per layer)."""
    return matching_rank(_specs(model, config), lava_params, budget, r_max)
