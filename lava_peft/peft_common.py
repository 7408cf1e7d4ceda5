"""What the HF PEFT formats share: the tensor-key prefix, a LoRA layer's PEFT tensors and config fields.

Used by :func:`lava_peft.interop.export_peft` / ``import_peft`` and by ``save_pretrained``, which writes
adapters PEFT can represent in PEFT's own layout (:mod:`lava_peft.model_files`).
"""

from __future__ import annotations

import re
from collections import Counter

import torch
from torch import nn

from .layers import AdaptedLayer, ConvOps, EmbeddingOps

PREFIX = "base_model.model."
"""HF PEFT's prefix of every adapter tensor key (``base_model.model.<module path>.<tensor>``)."""

LORA_KEY = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)")
"""A PEFT LoRA tensor key without :data:`PREFIX`: ``(module path, tensor name)``."""


def base_layer_at(base: nn.Module, path: str, problems: list[str]) -> nn.Module | None:
    """The layer at ``path`` of ``base`` (the base layer of an :class:`AdaptedLayer`), or ``None``
    with a note appended to ``problems`` when there is no such module (PEFT imports)."""
    try:
        found = base.get_submodule(path)
    except AttributeError:
        problems.append(f"{path}: no such module")
        return None
    return found.base_layer if isinstance(found, AdaptedLayer) else found


def lora_factor_role(peft_name: str) -> str:
    """``"down"`` for PEFT's ``lora_A`` tensors (``(r, fan_in)``), ``"up"`` for ``lora_B`` (``(out, r)``)."""
    return "down" if peft_name in ("lora_A.weight", "lora_embedding_A") else "up"


def lora_tensors(path: str, ops, spec, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT's LoRA tensors of one layer with ``ΔW = s · up @ down`` (``up (O, r)``, ``down (r, I·ΠK)``):
    ``lora_embedding_A/B`` on an Embedding, ``lora_A/B.weight`` elsewhere (conv: kernel-shaped ``A``,
    1×…×1 ``B``)."""
    if isinstance(ops, EmbeddingOps):
        return {f"{PREFIX}{path}.lora_embedding_A": down, f"{PREFIX}{path}.lora_embedding_B": up}
    if isinstance(ops, ConvOps):
        down = down.reshape(down.shape[0], -1, *spec.kernel_size)
        up = up.reshape(spec.out_dim, -1, *(1,) * len(spec.kernel_size))
    return {f"{PREFIX}{path}.lora_A.weight": down, f"{PREFIX}{path}.lora_B.weight": up}


def conv_matches_peft(conv: nn.Module) -> bool:
    """PEFT's conv LoRA runs ``lora_A`` with the base conv's stride and padding but no dilation, zero padding
    and one group: only such convs compute the same increment there."""
    return all(d == 1 for d in conv.dilation) and conv.padding_mode == "zeros" and conv.groups == 1


def lora_config_fields(ranks: dict[str, int], alphas: dict[str, float], *, use_rslora: bool, dropout: float,
                       fan_in_fan_out: bool, saved: list[str], base_model_name_or_path: str | None,
                       task_type: str | None = None, use_dora: bool = False) -> dict:
    """A HF PEFT ``LoraConfig`` dict giving module ``p`` rank ``ranks[p]`` and ``lora_alpha`` ``alphas[p]``
    (the most common values as ``r``/``lora_alpha``, the others as regex-escaped full-path patterns);
    ``use_dora``: the file also holds each module's ``lora_magnitude_vector`` (DoRA)."""
    r_default = Counter(ranks.values()).most_common(1)[0][0]
    alpha_default = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": r_default,
        "lora_alpha": alpha_default,
        "target_modules": "(?:" + "|".join(re.escape(p) for p in ranks) + ")",
        "rank_pattern": {re.escape(p): r for p, r in ranks.items() if r != r_default},
        "alpha_pattern": {re.escape(p): a for p, a in alphas.items() if a != alpha_default},
        "use_rslora": bool(use_rslora),
        "lora_dropout": float(dropout),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "modules_to_save": saved or None,
        "init_lora_weights": True,
        "use_dora": bool(use_dora),
    }


SHIRA_KEY = re.compile(r"(.+)\.(shira_weight|shira_indices)")
"""A PEFT SHiRA tensor key without :data:`PREFIX`: ``(module path, tensor name)``."""


def shira_tensors(path: str, in_dim: int, flat: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT's SHiRA tensors of one ``nn.Linear`` whose increment has ``values`` at the flat (row-major) indices
    ``flat`` of the ``(O, I)`` weight: ``shira_weight`` (the values, scale folded in) and ``shira_indices``
    ``(2, nnz)`` int32 (row, column) pairs, in the order of ``flat``."""
    flat = flat.long().cpu()
    return {f"{PREFIX}{path}.shira_weight": values.detach().float().cpu().contiguous(),
            f"{PREFIX}{path}.shira_indices": torch.stack([flat // in_dim, flat % in_dim]).to(torch.int32).contiguous()}


def shira_flat_indices(pairs: torch.Tensor, in_dim: int) -> torch.Tensor:
    """The flat (row-major) indices of PEFT's ``(2, nnz)`` (row, column) pairs, in the same order (int64)."""
    return pairs[0].long() * in_dim + pairs[1].long()


def shira_config_fields(ranks: dict[str, int], seed: int, base_model_name_or_path: str | None = None,
                        task_type: str | None = None) -> dict:
    """A HF PEFT ``ShiraConfig`` dict for modules ``ranks`` (one ``r`` for all: PEFT's budget ``r·(O + I)``).
    ``mask_type="random"``: PEFT builds a random mask on load and then loads the saved indices over it."""
    return {
        "peft_type": "SHIRA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": next(iter(ranks.values())),
        "mask_type": "random",
        "random_seed": seed,
        "target_modules": "(?:" + "|".join(re.escape(p) for p in ranks) + ")",
        "fan_in_fan_out": False,
        "init_weights": True,
        "modules_to_save": None,
    }


__all__ = ["LORA_KEY", "SHIRA_KEY", "shira_config_fields", "shira_flat_indices", "shira_tensors", "PREFIX", "base_layer_at", "conv_matches_peft", "lora_config_fields", "lora_factor_role",
           "lora_tensors"]
