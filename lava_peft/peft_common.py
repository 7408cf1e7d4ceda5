"""What the HF PEFT formats share: the tensor-key prefix and finding a module of the base model."""

from __future__ import annotations

from torch import nn

from .layers import AdaptedLayer

PREFIX = "base_model.model."
"""HF PEFT's prefix of every adapter tensor key (``base_model.model.<module path>.<tensor>``)."""


def base_layer_at(base: nn.Module, path: str, problems: list[str]) -> nn.Module | None:
    """The layer at ``path`` of ``base`` (the base layer of an :class:`AdaptedLayer`), or ``None``
    with a note appended to ``problems`` when there is no such module (PEFT imports)."""
    try:
        found = base.get_submodule(path)
    except AttributeError:
        problems.append(f"{path}: no such module")
        return None
    return found.base_layer if isinstance(found, AdaptedLayer) else found


__all__ = ["PREFIX", "base_layer_at"]
