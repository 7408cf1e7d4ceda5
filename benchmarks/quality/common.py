"""Helpers shared by the single-task quality scripts (``dylora_ranks.py``, ``methods.py``).

A minimal training loop (AdamW, linear warm-up over 6% of the steps then cosine decay, no
gradient clipping, ``loss = cross-entropy + model.regularization_loss()``), held-out
accuracy, and the run metadata (command, machine, versions, load average) that every
result file states.
"""

from __future__ import annotations

import math
import os
import platform
import time

import torch
import torch.nn.functional as F

import lava_peft as lp
from lava_peft.train.schedule import param_groups


def batches(data: dict, batch_size: int, generator: torch.Generator | None):
    """Batches of ``data`` (dict of equal-length tensors): shuffled by ``generator``, or in order."""
    n = len(data["labels"])
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield {k: v[idx] for k, v in data.items()}


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(model, data: dict, *, lr: float, epochs: int, batch_size: int, seed: int,
          head_lr: float | None = None) -> float:
    """Train the ``requires_grad`` parameters of ``model``; returns the seconds spent.

    ``head_lr``: lr of the ``modules_to_save`` copies (e.g. a new head), the rest at ``lr``;
    ``None``: everything at ``lr`` in one parameter group.  The data order is drawn from
    ``seed`` (its own generator).
    """
    if head_lr is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    else:
        split = param_groups(model)
        groups = [{"params": [p for _, p in split[key]], "lr": head_lr if key == "head" else lr}
                  for key in ("adapter", "head", "other") if split[key]]
    opt = torch.optim.AdamW(groups, lr=lr)
    total = math.ceil(len(data["labels"]) / batch_size) * epochs
    warmup = max(1, int(0.06 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    regularized = hasattr(model, "regularization_loss")
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in batches(data, batch_size, gen):
            labels = batch.pop("labels")
            loss = F.cross_entropy(model(**batch).logits, labels)
            if regularized:
                loss = loss + model.regularization_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model, data: dict, batch_size: int = 64) -> float:
    """Held-out accuracy in % (``model`` is put in eval mode)."""
    model.eval()
    correct = 0
    for batch in batches(data, batch_size, None):
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return 100.0 * correct / len(data["labels"])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages (rounded), or ``None`` where the OS has none."""
    return tuple(round(x, 2) for x in os.getloadavg()) if hasattr(os, "getloadavg") else None


def run_meta(script: str, argv: list[str], threads: int, settings: dict, wall_start: float) -> dict:
    """``command``, ``machine`` (with the load average now), ``versions``, ``settings``, ``wall_s``."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "command": f"python -m {script} " + " ".join(argv),
        "machine": f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} CPU cores visible, "
                   f"torch {threads} thread(s), load average at the end "
                   f"{tuple(round(x, 1) for x in load) if load else 'n/a'}",
        "versions": f"lava-peft {lp.__version__}, torch {torch.__version__}, Python {platform.python_version()}",
        "settings": settings,
        "wall_s": round(time.perf_counter() - wall_start, 1),
    }
