"""Generic text-classification plumbing: tokenise to tensors, iterate over batches."""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import torch

__all__ = ["tokenize", "iterate_batches"]


def tokenize(
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int] | None = None,
    max_len: int = 64,
) -> dict[str, torch.Tensor]:
    """Tokenise ``texts`` with a Hugging Face tokenizer into padded ``[N, max_len]`` tensors.

    Returns the tokenizer's tensors (``input_ids``, ``attention_mask`` and, for BERT-like
    tokenizers, ``token_type_ids``) plus ``labels`` (int64 ``[N]``) when given.  Texts
    longer than ``max_len`` tokens are truncated.
    """
    texts = list(texts)
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    enc = tokenizer(texts, max_length=max_len, truncation=True, padding="max_length", return_tensors="pt")
    out = {k: v for k, v in enc.items()}
    if labels is not None:
        out["labels"] = torch.as_tensor(list(labels), dtype=torch.long)
    return out


def iterate_batches(
    tensors: Mapping[str, torch.Tensor],
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield dicts of ``batch_size`` rows sliced from equal-length ``tensors``.

    With ``shuffle`` the order is a permutation drawn from ``torch.Generator`` seeded
    with ``seed`` (pass e.g. ``seed + epoch`` for a new order every epoch).  The last,
    smaller batch is yielded unless ``drop_last``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = {k: len(v) for k, v in tensors.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"tensors have different lengths: {lengths}")
    n = next(iter(lengths.values()), 0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield {k: v[idx] for k, v in tensors.items()}
