"""AdamW with separate parameter groups (adapter / head / other) and warmup schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..inject import adapted_layers, saved_module_wrappers


def param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters split into ``adapter`` (inside adapted layers), ``head``
    (``modules_to_save`` copies) and ``other`` (anything else that requires grad,
    e.g. full fine-tuning of a plain model).  Names are relative to ``model``."""
    adapter_ids, head_ids = set(), set()
    for _, layer in adapted_layers(model):
        adapter_ids.update(id(p) for p in layer.adapters.parameters())
    for _, wrapper in saved_module_wrappers(model):
        head_ids.update(id(p) for p in wrapper.copies.parameters())
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"adapter": [], "head": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "adapter" if id(p) in adapter_ids else "head" if id(p) in head_ids else "other"
        groups[key].append((name, p))
    return groups


def build_optimizer(model: nn.Module, args) -> tuple[torch.optim.Optimizer, dict[str, int]]:
    """AdamW over the trainable parameters; returns it and the parameter count per group."""
    groups = param_groups(model)
    head_lr = args.lr if args.head_lr is None else args.head_lr
    head_wd = args.weight_decay if args.head_weight_decay is None else args.head_weight_decay
    settings = {"adapter": (args.lr, args.weight_decay), "head": (head_lr, head_wd), "other": (args.lr, args.weight_decay)}
    torch_groups, counts = [], {}
    for key, params in groups.items():
        if not params:
            continue
        lr, wd = settings[key]
        torch_groups.append({"params": [p for _, p in params], "lr": lr, "weight_decay": wd, "name": key})
        counts[key] = sum(p.numel() for _, p in params)
    if not torch_groups:
        from ..errors import LavaError

        raise LavaError(
            "the model has no trainable parameters: adapt it first (lp.adapt(model, config)) "
            "or set requires_grad=True on the parameters to train"
        )
    return torch.optim.AdamW(torch_groups), counts


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the base lr at step ``s`` (0-based, applied before step ``s``'s update)."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer, args, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = args.warmup_steps if args.warmup_steps is not None else int(round(args.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.schedule, warmup, total_steps))
