"""Index-based batching: deterministic order, exact gradient accumulation and DDP sharding.

Training data is a dict of equal-length tensors (``{"input_ids": ..., "labels": ...}``),
an ``(inputs, labels)`` tuple, or any map-style ``torch.utils.data.Dataset``.  The order of
epoch ``e`` is ``randperm(N, seed + e)``; every optimizer step takes the next *global batch*
of indices, cut into ``grad_accum_steps`` micro-batches and each of those into
``world_size`` shards.  So the samples of a step do not depend on how the global batch
is split, and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from ..errors import LavaError


class IndexedData:
    """Uniform ``len`` + ``batch(indices)`` over the accepted data forms."""

    def __init__(self, data: Any, name: str = "data"):
        self.name = name
        if isinstance(data, IndexedData):
            self.tensors, self.dataset = data.tensors, data.dataset
        elif isinstance(data, Mapping):
            tensors = {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for k, v in data.items()}
            lengths = {k: len(v) for k, v in tensors.items()}
            if len(set(lengths.values())) != 1:
                raise LavaError(f"{name}: all tensors must have the same length; got {lengths}")
            self.tensors, self.dataset = tensors, None
        elif isinstance(data, tuple) and len(data) == 2:
            x, y = (v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for v in data)
            if len(x) != len(y):
                raise LavaError(f"{name}: inputs have {len(x)} rows but labels {len(y)}")
            self.tensors, self.dataset = {"x": x, "labels": y}, None
        elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            self.tensors, self.dataset = None, data
        else:
            raise LavaError(
                f"{name} must be a dict of equal-length tensors, an (inputs, labels) tuple or a "
                f"map-style torch Dataset; got {type(data).__name__}"
            )
        if len(self) == 0:
            raise LavaError(f"{name} is empty")

    def __len__(self) -> int:
        if self.tensors is not None:
            return len(next(iter(self.tensors.values())))
        return len(self.dataset)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        if self.tensors is not None:
            idx = torch.as_tensor(indices, dtype=torch.long)
            return trim_padding({k: v[idx] for k, v in self.tensors.items()})
        items = [self.dataset[int(i)] for i in indices]
        out = default_collate(items)
        if isinstance(out, (list, tuple)) and len(out) == 2:
            out = {"x": out[0], "labels": out[1]}
        if not isinstance(out, dict):
            raise LavaError(f"{self.name}: items must be dicts or (inputs, label) pairs; got {type(items[0]).__name__}")
        return trim_padding(out)


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop trailing all-padding columns of token batches (``attention_mask`` present).

    Inputs padded to a fixed ``max_len`` cost the full length; the snippets of a batch are
    usually much shorter.  Exact: padded positions are masked out anyway.
    """
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    keep = int(mask.sum(1).max().item()) if mask.numel() else 0
    keep = max(keep, 1)
    if keep >= mask.shape[1]:
        return batch
    seq = mask.shape[1]
    out = {k: (v[:, :keep] if v.dim() == 2 and v.shape[1] == seq and k != "labels" else v) for k, v in batch.items()}
    labels = batch.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape[1] == seq and bool((labels[:, keep:] == -100).all()):
        out["labels"] = labels[:, :keep]  # token labels (causal LM): the cut columns are all ignored (-100)
    return out


def epoch_order(n: int, seed: int, epoch: int, lengths: torch.Tensor | None = None, global_batch: int = 1,
                chunk_batches: int = 32) -> torch.Tensor:
    """Sample order of ``epoch``: a seeded permutation.  With ``lengths`` (group by length),
    every run of ``chunk_batches`` global batches is sorted by length and the batches are then
    shuffled, so a batch holds samples of similar length (less padding) yet the order stays
    random and deterministic."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=gen)
    if lengths is None or global_batch <= 1:
        return order
    chunk = global_batch * chunk_batches
    pieces = []
    for start in range(0, n, chunk):
        part = order[start : start + chunk]
        pieces.append(part[torch.argsort(lengths[part], descending=True, stable=True)])
    order = torch.cat(pieces)
    full = n // global_batch
    batches = order[: full * global_batch].view(full, global_batch)
    batches = batches[torch.randperm(full, generator=gen)]
    return torch.cat([batches.reshape(-1), order[full * global_batch :]])


def sample_lengths(data: "IndexedData") -> torch.Tensor | None:
    """Token counts (``attention_mask`` sums) of tensor data, else None."""
    if data.tensors is None or "attention_mask" not in data.tensors:
        return None
    mask = data.tensors["attention_mask"]
    return mask.sum(1) if mask.dim() == 2 else None


def global_steps(n: int, global_batch: int, accum: int, world: int) -> int:
    """Optimizer steps per epoch. A last partial global batch is kept if every rank gets
    at least one sample in every micro-batch (else dropped)."""
    full, rest = divmod(n, global_batch)
    return full + (1 if rest >= accum * world else 0)


def step_shards(order: torch.Tensor, step: int, global_batch: int, accum: int, world: int, rank: int):
    """The indices of this rank's ``accum`` micro-batches for optimizer step ``step`` of the
    epoch, and the global batch size ``n_global`` (for exact loss weighting)."""
    g = order[step * global_batch : (step + 1) * global_batch]
    micro = torch.tensor_split(g, accum)
    return [torch.tensor_split(m, world)[rank] for m in micro], len(g)
