"""Save / load a :class:`RankingAdapter`: ``ranking_config.json`` + ``ranking_model.safetensors``.

The safetensors file holds every trainable tensor by its name in the adapter (prompts,
projections, fusion, heads, and the adapter tensors of an adapted tower such as
``image_tower.net.…lava…``); the JSON holds the :class:`RankingConfig` and the tensor names.
Both are written to a temp file and renamed (weights first, config last, so a directory with a
config is complete).  Nothing is unpickled.  The towers themselves are not stored: pass the
same towers (for an adapted tower, the same ``lp.adapt`` config) to :func:`load_ranking_adapter`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..errors import AdapterFileError
from ..io import atomic_save_safetensors, atomic_write_json, read_json, read_safetensors
from .adapter import RankingAdapter, RankingConfig

__all__ = ["RANKING_CONFIG", "RANKING_WEIGHTS", "load_ranking_adapter", "save_ranking_adapter"]

RANKING_CONFIG = "ranking_config.json"
RANKING_WEIGHTS = "ranking_model.safetensors"
FORMAT = "lava-peft-ranking-adapter"


def save_ranking_adapter(model: RankingAdapter, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model``'s trainable tensors and config into ``directory``; returns it."""
    directory = Path(directory)
    state = model.trainable_state()
    atomic_save_safetensors(state, directory / RANKING_WEIGHTS, {"format": "pt", "library": "lava-peft"})
    payload = {"format": FORMAT, "version": 1, "library_version": __version__, "config": model.config.to_dict(),
               "tensors": {k: list(v.shape) for k, v in state.items()}, **(extra or {})}
    atomic_write_json(directory / RANKING_CONFIG, payload)
    return directory


def read_ranking_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / RANKING_CONFIG
    payload = read_json(path)
    if payload.get("format") != FORMAT or "config" not in payload:
        raise AdapterFileError(f"{path} is not a ranking adapter config (format {payload.get('format')!r}); "
                               "give a directory written by save_ranking_adapter()")
    return payload


@torch.no_grad()
def load_ranking_adapter(directory: str | os.PathLike, image_tower: nn.Module | None, text_tower: nn.Module | None,
                         **widths) -> RankingAdapter:
    """Rebuild the adapter saved in ``directory`` on these towers.  Keys and shapes are checked
    against the file before any tensor is copied; a mismatch raises :class:`AdapterFileError`."""
    directory = Path(directory)
    payload = read_ranking_config(directory)
    config = RankingConfig.from_dict(payload["config"])
    tensors = read_safetensors(directory / RANKING_WEIGHTS)
    model = RankingAdapter(image_tower, text_tower, config, **widths)
    state = model.trainable_state()
    missing, unexpected = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    wrong = [k for k in state if k in tensors and tensors[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise AdapterFileError(
            f"{directory / RANKING_WEIGHTS} does not fit these towers/config: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, wrong shape {wrong[:3]}; load it with the towers (and tower adapters) it was trained with")
    for key, param in state.items():
        param.copy_(tensors[key])
    return model
