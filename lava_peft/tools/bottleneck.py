"""Bottleneck adapters on a whole model: the output scale and the 1-bit reference's scale search.

The 1-bit reference (PETL-ViT ``binary_adapter``) searches the adapter scale ``s`` per task over
:data:`~lava_peft.methods.bottleneck.SCALE_GRID` = (0.01, 0.1, 1, 10, 100) and keeps the best on
validation data.  :func:`search_scale` runs that loop around a user function that trains and
scores one model; :func:`set_scale` changes ``s`` of an existing adapter in place.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

from ..errors import LavaConfigError
from ..methods.bottleneck import SCALE_GRID, BottleneckAdapter, BottleneckConfig
from ._common import adapter_of_method


def set_scale(model, scale: float, adapter_name: str | None = None) -> None:
    """Set ``s`` (the factor on the adapter's output) of every layer of a bottleneck adapter, and its config."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LavaConfigError(f"scale must be a finite number; got {scale!r}")
    name, config, layers = adapter_of_method(model, adapter_name, BottleneckConfig, "set_scale")
    for _, adapter in layers:
        if isinstance(adapter, BottleneckAdapter):
            adapter.scale = float(scale)
    model.peft_config[name] = config.replace(scale=float(scale))


def search_scale(train_and_score: Callable[[float], float], grid: Iterable[float] = SCALE_GRID) -> tuple[float, dict]:
    """``(best scale, {scale: score})``: ``train_and_score(s)`` builds and trains a model with adapter scale
    ``s`` and returns its validation score (higher is better; ties: the first in ``grid`` order)."""
    scores = {float(s): float(train_and_score(float(s))) for s in grid}
    if not scores:
        raise LavaConfigError("grid is empty; give at least one scale")
    best = max(scores, key=lambda s: (scores[s], -list(scores).index(s)))
    return best, scores


__all__ = ["search_scale", "set_scale"]
