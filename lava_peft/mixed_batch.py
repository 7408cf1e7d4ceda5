"""Mixed-adapter batches: the per-sample adapter names and the grouped low-rank product.

In a mixed batch sample ``b`` uses adapter ``a(b)`` (or the base model).  For low-rank
adapters on a linear layer (``nn.Linear``, GPT-2 ``Conv1D``) with ``ΔW_a = s_a U_a V_a``
(``U_a``: ``O×r_a``, ``V_a``: ``r_a×I``) the layer computes, for every sample at once,

    y_b = base(x_b) + (x_b V_{a(b)}ᵀ) (s U)_{a(b)}ᵀ

as two batched GEMMs over the samples (:func:`grouped_lowrank_forward`):

* the factors of the adapters in the batch are stacked once, ``V_stack (A, R, I)`` and
  ``(sU)ᵀ_stack (A, R, O)`` with ``R = max r_a``; a smaller rank is padded with zero rows and
  columns, and the base model (or an adapter that does not adapt this layer) gets an
  all-zero slot, so the padding adds exact zeros;
* per row (``T ≥ R`` tokens per sample: prefill, classification): ``h = bmm(x, V_stack[slot]ᵀ)``
  (``B × T × R``) and ``y = baddbmm(base, h, (sU)ᵀ_stack[slot])`` — each row's factors are gathered,
  ``B·R·(I+O)`` values;
* per adapter (``T < R``: decoding one token at a time): the rows are regrouped by adapter into
  ``(A, M·T, I)`` (``M`` = most rows of one adapter; short blocks padded with a row whose result is
  dropped), ``bmm`` with ``V_stackᵀ`` and ``(sU)ᵀ_stack`` as they are, and the ``(A·M, T, O)``
  increments are read back in row order — ``B·T·(I+O)`` values moved instead of factors.

On the 2-core CPU (``benchmarks/mixed_serving.py``, a small Llama, 8-32 adapters) the per-row form
was faster from about 16 tokens per sample on and the per-adapter one at one token; the loop over
adapters was slower than both.

The stacks are cached per layer and per set of adapter names; an entry is reused only while
every factor tensor is the same object, at the same storage and in-place version
(``Tensor._version``, bumped by optimizer steps, ``copy_``, ``load_state_dict``), with the same
scale.  Anything else (an adapter trained, replaced, removed, re-added) rebuilds it.  With
gradients enabled the stacks are built fresh on every call and autograd flows through them.

Adapters that are not plain low-rank increments on a linear layer (SHiRA, DoRA, conv kernels,
embeddings), adapters in training mode (dropout, DyLoRA's drawn rank, MoSA's module) and
module adapters keep the per-adapter loop of :meth:`AdaptedLayer._forward_mixed`.
``use_grouped_products(False)`` switches the grouped path off (the reference in tests).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import LavaError

BASE_NAME = "__base__"
"""Name that selects the plain base model for a sample in a mixed-adapter batch."""

_GROUPED = [True]
_STRATEGY = ["auto"]  # "rows" | "adapters" | "auto" (rows when tokens per sample >= the stacked rank)
_MAX_CACHED_SETS = 4  # stacks kept per layer (one per distinct set of adapter names)


STRATEGIES = ("auto", "rows", "adapters")


@contextlib.contextmanager
def use_grouped_products(enabled: bool, strategy: str = "auto"):
    """Within the block, mixed batches use (``True``) or skip (``False``) the grouped low-rank product.

    ``strategy`` (see :func:`grouped_lowrank_forward`): ``"rows"`` gathers every row's factors,
    ``"adapters"`` regroups the rows by adapter, ``"auto"`` picks per call."""
    if strategy not in STRATEGIES:
        raise LavaError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    previous = _GROUPED[0], _STRATEGY[0]
    _GROUPED[0], _STRATEGY[0] = bool(enabled), strategy
    try:
        yield
    finally:
        _GROUPED[0], _STRATEGY[0] = previous


class MixedBatch:
    """Per-sample adapter names for one mixed-adapter forward pass, with cached row groups.

    ``groups(batch, device)`` returns ``[(name, row indices)]`` once per batch size and
    device (shared by every layer); ``row_slots(batch, device)`` the position of each row's
    name in :attr:`distinct` (the grouped product's stack index).  With ``expand=True`` (used
    by ``generate``) a batch that is ``k`` times longer than ``names`` is read as each sample
    repeated ``k`` times in a row (``repeat_interleave``), which is how transformers expands
    inputs for beam search and ``num_return_sequences``.
    """

    def __init__(self, names: Sequence[str], expand: bool = False):
        self.names = list(names)
        self.expand = expand
        self.distinct = tuple(dict.fromkeys(self.names))
        self._cache: dict = {}
        self._slots: dict = {}
        self._layouts: dict = {}

    def __len__(self) -> int:
        return len(self.names)

    def _repeat(self, batch: int) -> int:
        n = len(self.names)
        if batch == n:
            return 1
        if self.expand and n and batch % n == 0:
            return batch // n
        raise LavaError(
            f"adapter_names has {n} entries but the batch has {batch} samples; "
            f"give one adapter name per sample (use {BASE_NAME!r} for the base model)"
        )

    def groups(self, batch: int, device) -> list[tuple[str, torch.Tensor]]:
        key = (int(batch), str(device))
        hit = self._cache.get(key)
        if hit is None:
            rep = self._repeat(batch)
            rows: dict[str, list[int]] = {}
            for i, name in enumerate(self.names):
                rows.setdefault(name, []).extend(range(i * rep, (i + 1) * rep))
            hit = [(name, torch.tensor(r, dtype=torch.long, device=device)) for name, r in rows.items()]
            self._cache[key] = hit
        return hit

    def row_slots(self, batch: int, device) -> torch.Tensor:
        """``(batch,)`` long tensor: row ``i`` uses ``distinct[slots[i]]``."""
        key = (int(batch), str(device))
        hit = self._slots.get(key)
        if hit is None:
            rep = self._repeat(batch)
            where = {name: k for k, name in enumerate(self.distinct)}
            hit = torch.tensor([where[n] for n in self.names], dtype=torch.long, device=device)
            hit = hit.repeat_interleave(rep) if rep > 1 else hit
            self._slots[key] = hit
        return hit

    def adapter_layout(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Rows regrouped by adapter, ``M`` = the most rows any name has: ``(order (S·M,), position (batch,), M)``.

        ``x.index_select(0, order).view(S, M, …)`` puts the rows of ``distinct[s]`` first in block ``s``
        (blocks shorter than ``M`` are filled with row 0, whose results are never read); row ``i`` of the
        batch is row ``position[i]`` of the flattened ``(S·M, …)`` result."""
        key = (int(batch), str(device))
        hit = self._layouts.get(key)
        if hit is None:
            slots = self.row_slots(batch, "cpu").tolist()
            blocks: list[list[int]] = [[] for _ in self.distinct]
            for row, slot in enumerate(slots):
                blocks[slot].append(row)
            most = max(len(b) for b in blocks)
            order, position = [], [0] * batch
            for k, rows in enumerate(blocks):
                for m, row in enumerate(rows):
                    position[row] = k * most + m
                order += rows + [0] * (most - len(rows))
            hit = (torch.tensor(order, dtype=torch.long, device=device),
                   torch.tensor(position, dtype=torch.long, device=device), most)
            self._layouts[key] = hit
        return hit


# --------------------------------------------------------------------------- grouped product
def _grouped_factors(layer, names: Sequence[str]):
    """``[(down, up, scale) or None]`` per name (``None``: no increment on this layer), or ``None`` when
    some adapter cannot take the grouped path."""
    if layer.spec.kind != "linear":
        return None
    out = []
    for name in names:
        adapter = layer.adapters[name] if name in layer.adapters else None
        if adapter is None:
            out.append(None)
            continue
        if adapter.training or not adapter.merges_additively or adapter.uses_weight_path():
            return None
        factors = adapter.linear_factors()
        if factors is None:
            return None
        out.append(factors)
    return out


def _signature(factors) -> tuple:
    return tuple(None if f is None else (f[0]._version, f[1]._version, f[0].data_ptr(), f[1].data_ptr(), float(f[2]))
                 for f in factors)


def _same_tensors(cached, factors) -> bool:
    return all((c is None and f is None) or (c is not None and f is not None and c[0] is f[0] and c[1] is f[1])
               for c, f in zip(cached, factors))


def _build_stacks(factors, dtype_in: torch.dtype, dtype_out: torch.dtype, in_dim: int, out_dim: int, device):
    """``(V_stack (A, R, I), (sU)ᵀ_stack (A, R, O))``, zero-padded to the largest rank ``R``."""
    rank = max((f[0].shape[0] for f in factors if f is not None), default=1)
    downs, ups = [], []
    for f in factors:
        if f is None:
            downs.append(torch.zeros(rank, in_dim, dtype=dtype_in, device=device))
            ups.append(torch.zeros(rank, out_dim, dtype=dtype_out, device=device))
            continue
        down, up, scale = f
        pad = rank - down.shape[0]
        down = down.to(device=device, dtype=dtype_in)
        up_t = (up * scale).T.to(device=device, dtype=dtype_out)
        downs.append(F.pad(down, (0, 0, 0, pad)) if pad else down)
        ups.append(F.pad(up_t, (0, 0, 0, pad)) if pad else up_t)
    return torch.stack(downs), torch.stack(ups)


def _stacks(layer, names: tuple, factors, dtype_in, dtype_out, in_dim: int, out_dim: int, device):
    """The stacks for ``names`` on ``layer``: cached unless gradients are enabled (see the module doc)."""
    if torch.is_grad_enabled():
        return _build_stacks(factors, dtype_in, dtype_out, in_dim, out_dim, device)
    cache = layer.__dict__.setdefault("_mixed_stacks", {})
    key = (names, dtype_in, dtype_out, str(device))
    signature = _signature(factors)
    entry = cache.get(key)
    if entry is not None and entry[1] == signature and _same_tensors(entry[0], factors):
        return entry[2]
    stacks = _build_stacks(factors, dtype_in, dtype_out, in_dim, out_dim, device)
    cache.pop(key, None)
    while len(cache) >= _MAX_CACHED_SETS:
        cache.pop(next(iter(cache)))
    # the factor tensors are held so that the identity check above cannot be fooled by a reused id
    cache[key] = ([None if f is None else (f[0], f[1]) for f in factors], signature, stacks)
    return stacks


def grouped_lowrank_forward(layer, x: torch.Tensor, plan: MixedBatch) -> torch.Tensor | None:
    """The mixed-batch output of an :class:`~lava_peft.layers.AdaptedLayer` by the grouped product, or
    ``None`` when it does not apply (switched off, not a linear layer, an adapter that is not a plain
    low-rank increment or is in training mode).  ``x``: ``(B, ..., I)``, one adapter per row of dim 0."""
    if not _GROUPED[0] or not x.is_floating_point() or x.dim() < 2:
        return None
    factors = _grouped_factors(layer, plan.distinct)
    if factors is None:
        return None
    base = layer.base_layer(x)
    if all(f is None for f in factors):
        return base
    batch, in_dim, out_dim = x.shape[0], x.shape[-1], base.shape[-1]
    down, up_t = _stacks(layer, plan.distinct, factors, x.dtype, base.dtype, in_dim, out_dim, x.device)
    x3, base3 = x.reshape(batch, -1, in_dim), base.reshape(batch, -1, out_dim)
    rank = down.shape[1]
    if _STRATEGY[0] == "rows" or (_STRATEGY[0] == "auto" and x3.shape[1] >= rank):
        # per row: gather each row's factors (B·R·(I+O) values), then two bmm over the rows
        slots = plan.row_slots(batch, x.device)
        hidden = torch.bmm(x3, down.index_select(0, slots).transpose(1, 2))
        up_rows = up_t.index_select(0, slots)
        if torch.is_grad_enabled():
            out = torch.baddbmm(base3, hidden.to(base.dtype), up_rows)
        else:  # the fresh base output is ours: accumulate into it (no second B·T·O tensor)
            out = base3.baddbmm_(hidden.to(base.dtype), up_rows)
    else:
        # per adapter: regroup the rows by adapter (B·T·(I+O) values moved), two bmm over the adapters
        order, position, most = plan.adapter_layout(batch, x.device)
        tokens = x3.shape[1]
        grouped = x3.index_select(0, order).view(len(plan.distinct), most * tokens, in_dim)
        hidden = torch.bmm(grouped, down.transpose(1, 2)).to(base.dtype)
        delta = torch.bmm(hidden, up_t).view(-1, tokens, out_dim)
        out = base3 + delta.index_select(0, position)
    return out.view(base.shape)
