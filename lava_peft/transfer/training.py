"""One small adapter-training loop shared by every Trans-LoRA stage.

AdamW without weight decay and a linear learning-rate decay to 0 without warmup (the
paper's defaults); mini-batches are drawn by a seeded shuffle each epoch.  The loss of a
batch is ``loss_fn(batch) + model.regularization_loss()`` (LAVA's orthogonality term and
the like; 0 for plain LoRA).
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

import lava_peft as lp

__all__ = ["train_adapter", "adapter_config"]

METHODS = ("lora", "lava", "dylora")


def lm_target_modules(model) -> list[str]:
    """Names of every Linear / GPT-2 ``Conv1D`` of ``model``, the output head included.

    The head is adapted on purpose: on the small zoo LMs a frozen final norm + (tied) head
    caps how peaked the next-token distribution can get (measured on ``llama-tiny``: the
    answer loss plateaus near 4 nats with ``"all-linear"``, and drops below 0.5 with the head).
    """
    names: list[str] = []
    inside: tuple[str, ...] = ()  # prefixes of layers that already host adapters
    for name, module in model.named_modules():
        if not name or name.startswith(inside):
            continue
        if isinstance(module, lp.AdaptedLayer):
            names.append(name)
            inside += (name + ".",)
        elif isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names.append(name)
    return names


def adapter_config(method: str, r: int, alpha: float, model=None) -> lp.AdapterConfig:
    """Adapter config of ``method`` on ``lm_target_modules(model)`` (``"all-linear"`` without a model)."""
    targets = lm_target_modules(model) if model is not None else "all-linear"
    if method == "lora":
        return lp.LoraConfig(r=r, alpha=alpha, target_modules=targets)
    if method == "lava":
        return lp.LavaConfig(r=r, alpha=alpha, target_modules=targets)
    if method == "dylora":
        return lp.DyLoraConfig(r=r, alpha=alpha, target_modules=targets)
    from .errors import TransferError

    raise TransferError(f"unknown adapter method {method!r}; choose one of {list(METHODS)}")


def train_adapter(model: lp.AdaptedModel, examples: Sequence, loss_fn: Callable[[list], torch.Tensor], *,
                  epochs: int, lr: float, batch_size: int, seed: int, desc: str, progress: bool = True) -> list[float]:
    """Train the trainable parameters (the active adapter) of ``model``; returns per-step losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / max(steps, 1)))
    rng = random.Random(seed)
    order = list(range(len(examples)))
    losses: list[float] = []
    model.train()
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    for _ in range(epochs):
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            loss = loss_fn(batch) + model.regularization_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses
