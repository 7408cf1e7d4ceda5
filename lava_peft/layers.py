"""Layer wrappers: a frozen base layer hosting any number of named weight-delta adapters.

Every supported layer type is described by a :class:`LayerOps` (how its weight is laid
out and how to run it with another weight).  Adapters always speak the *canonical*
layout ``(O, I, K1, ..., KN)``:

===============================  ====================  ==========================
layer                            base weight layout    canonical ``(O, I, *K)``
===============================  ====================  ==========================
``nn.Linear``                    ``(out, in)``         same
GPT-2 ``Conv1D``                 ``(in, out)``         transpose
``nn.Conv1d/2d/3d``              ``(O, I/groups, *K)`` same (``I`` = in/groups)
``nn.Embedding``                 ``(vocab, dim)``      ``(dim, vocab)``
===============================  ====================  ==========================

:class:`AdaptedLayer` runs the active adapters in one of two ways, chosen per adapter
(:meth:`DeltaAdapter.uses_weight_path`):

* *weight path* — ``y = f(x; W0 + Σ ΔW_a)``: one call of the base op with the summed
  weight (best for conv kernels, whose CP/flattened ΔW is cheap to build);
* *factored path* — ``y = f(x; W0) + adapter(x)``, e.g. ``x V^T U^T s`` for low rank,
  never materialising ``ΔW`` (best for Linear/Embedding).

Merging adds ``ΔW`` into the base weight in place; unmerging subtracts it.  Low-rank
adapters do it with one ``addmm`` on their factors, sparse adapters (an optional
``sparse_delta() -> (flat canonical indices, values)``, e.g. SHiRA) with one
``index_add_``/``index_put_`` of their values, others through ``delta_weight()``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterNameError, LavaError
from .fused_linear import frozen_linear_weight, fusable
from .methods.base import DeltaAdapter, LayerSpec, ModuleAdapter
from .methods.factors import adapter_factors, adapter_factors_and_scale
from .mixed_batch import BASE_NAME, MixedBatch, grouped_lowrank_forward  # noqa: F401 (re-exported)


# --------------------------------------------------------------------------- layer ops
class LayerOps:
    """How to read a layer's weight and run the layer with a substitute weight."""

    name = "base"

    def spec(self, layer: nn.Module) -> LayerSpec:
        raise NotImplementedError  # pragma: no cover - abstract

    def to_base_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def forward_with_weight(self, layer: nn.Module, x, weight: torch.Tensor, with_bias: bool = True):
        raise NotImplementedError  # pragma: no cover - abstract


class LinearOps(LayerOps):
    name = "Linear"

    def spec(self, layer):
        return LayerSpec("linear", layer.out_features, layer.in_features)

    def forward_with_weight(self, layer, x, weight, with_bias=True):
        return F.linear(x, weight, layer.bias if with_bias else None)


class GPT2Conv1DOps(LayerOps):
    """transformers' ``Conv1D``: a linear layer whose weight is stored as (in, out)."""

    name = "Conv1D"

    def spec(self, layer):
        in_dim, out_dim = layer.weight.shape
        return LayerSpec("linear", out_dim, in_dim)

    def to_base_layout(self, delta):
        return delta.T

    def forward_with_weight(self, layer, x, weight, with_bias=True):
        if with_bias and layer.bias is not None:  # the op Conv1D itself runs, so W0 + 0 gives its exact output
            out = torch.addmm(layer.bias, x.reshape(-1, x.shape[-1]), weight)
            return out.view(*x.shape[:-1], out.shape[-1])
        return x @ weight


class ConvOps(LayerOps):
    name = "ConvNd"

    def spec(self, layer):
        out_c, in_per_group, *kernel = layer.weight.shape
        return LayerSpec("conv", out_c, in_per_group, tuple(kernel), layer.groups)

    def forward_with_weight(self, layer, x, weight, with_bias=True):
        # _conv_forward handles string padding, padding modes, stride, dilation, groups.
        return layer._conv_forward(x, weight, layer.bias if with_bias else None)


class EmbeddingOps(LayerOps):
    name = "Embedding"

    def spec(self, layer):
        return LayerSpec("embedding", layer.embedding_dim, layer.num_embeddings, padding_idx=layer.padding_idx)

    def to_base_layout(self, delta):
        return delta.T

    def forward_with_weight(self, layer, x, weight, with_bias=True):
        return F.embedding(
            x, weight, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq, layer.sparse
        )


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layer_ops(module: nn.Module) -> LayerOps | None:
    """The ops for a supported layer, or ``None``."""
    if isinstance(module, nn.Linear):
        return LinearOps()
    if isinstance(module, _CONV_TYPES):
        return ConvOps()
    if isinstance(module, nn.Embedding):
        return EmbeddingOps()
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return GPT2Conv1DOps()
    return None


SUPPORTED_LAYER_TYPES = "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, transformers Conv1D"


# --------------------------------------------------------------------------- the wrapper
def _scatter_add_(canonical: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float) -> None:
    """``canonical.reshape(-1)[indices] += alpha·values`` in place (``canonical`` may be a transposed view).

    Contiguous: ``index_add_`` on the flat view; otherwise ``index_put_(accumulate=True)`` at the
    unravelled coordinates.  Only ``len(indices)``-sized temporaries are made.
    """
    values = values.detach().to(device=canonical.device, dtype=canonical.dtype)
    indices = indices.to(canonical.device)
    if canonical.is_contiguous():
        canonical.view(-1).index_add_(0, indices, values, alpha=alpha)
    else:
        coords, rest = [], indices.long()
        for size in reversed(canonical.shape):  # unravel (row-major); torch.unravel_index needs torch >= 2.2
            coords.append(rest % size)
            rest = rest // size
        canonical.index_put_(tuple(reversed(coords)), values if alpha == 1.0 else values * alpha, accumulate=True)


def walk_modules(model: nn.Module, stop: tuple[type, ...] = (DeltaAdapter, ModuleAdapter), prefix: str = "",
                 _seen: set | None = None):
    """``model.named_modules()`` (same order, same names, each module once) without descending into instances
    of ``stop`` (they are yielded themselves).  By default it skips the insides of adapters, which hold no
    layers, wrappers or hosts: a model with ``n`` adapters is walked in time independent of ``n``'s modules."""
    seen = set() if _seen is None else _seen
    if id(model) in seen:
        return
    seen.add(id(model))
    yield prefix, model
    if isinstance(model, stop):
        return
    for name, child in model._modules.items():
        if child is not None:
            yield from walk_modules(child, stop, f"{prefix}.{name}" if prefix else name, seen)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite: ``max |t|`` is finite exactly then (``amax`` propagates NaN),
    and one reduction is ~10x faster on CPU than ``isfinite(t).all()``."""
    return t.numel() == 0 or bool(torch.isfinite(t.detach().abs().amax()))


def _wants_weight_path(adapter: nn.Module, x, layer: nn.Module) -> bool:
    choose = getattr(adapter, "uses_weight_path_for", None)
    return choose(x, layer) if choose is not None else adapter.uses_weight_path()


class AdaptedLayer(nn.Module):
    """A frozen base layer plus named adapters (``self.adapters[name]``)."""

    def __init__(self, base_layer: nn.Module, ops: LayerOps):
        super().__init__()
        self.base_layer = base_layer
        self.ops = ops
        self.spec = ops.spec(base_layer)
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.mixed_adapter_names: Sequence[str] | None = None
        self._merge_backup: torch.Tensor | None = None  # unmerged weight, kept by merge(backup=True)
        self.sibling_group = None  # layers reading the same input (lava_peft.fused_siblings), set by inject
        for p in base_layer.parameters():
            p.requires_grad_(False)

    # attribute fall-through so that code reading e.g. ``layer.weight`` or
    # ``layer.in_features`` on the wrapped module keeps working
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def fingerprint_shape(self) -> list[int]:
        """What the base-model fingerprint records for this layer: its weight shape."""
        return list(self.base_weight.shape)

    def release(self) -> nn.Module:
        """The base layer, to put back in the model when the adapters are removed."""
        return self.base_layer

    # ------------------------------------------------------------------ adapters
    def add(self, name: str, adapter: nn.Module) -> None:
        if name in self.adapters:
            raise AdapterNameError(f"adapter {name!r} already exists on this layer")
        weight = self.base_weight
        adapter.to(device=weight.device)
        self.adapters[name] = adapter

    def remove(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        del self.adapters[name]
        self.__dict__.pop("_mixed_stacks", None)  # mixed-batch factor stacks (mixed_batch.py) holding its tensors
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def delta_in_base_layout(self, name: str) -> torch.Tensor:
        """``ΔW`` of adapter ``name`` in the base weight's layout and dtype."""
        delta = self.adapters[name].delta_weight()
        return self.ops.to_base_layout(delta).to(self.base_weight.dtype)

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, names: Sequence[str] | None = None, backup: bool = False, check: bool = True) -> None:
        """Add ``ΔW`` of ``names`` (default: the active adapters) into the base weight, in place.

        ``backup=True`` first keeps a copy of the unmerged weight, so that :meth:`unmerge`
        restores it bit for bit (``W0 + ΔW − ΔW`` is not ``W0`` in floating point) and
        :meth:`remerge` switches adapters in one pass (``W ← W0 + ΔW_new``).  All
        increments are checked to be finite before the weight is touched (``check=False``: the
        caller already did).
        """
        names = self.active_adapters if names is None else names
        todo = [n for n in dict.fromkeys(names) if n in self.adapters and n not in self.merged_adapters]
        for name in todo if check else ():
            self._check_finite(name)
        if backup and todo and self._merge_backup is None and not self.merged_adapters:
            self._merge_backup = self.base_weight.detach().clone()
        for name in todo:
            self._add_delta_(name, 1.0)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, keep_backup: bool = False) -> None:
        """Remove every merged ``ΔW``: copy back the backup if there is one (bit-exact), else
        subtract the increments in reverse order of merging (exact up to rounding)."""
        if self._merge_backup is not None:
            self.base_weight.data.copy_(self._merge_backup)
            self.merged_adapters.clear()
            if not keep_backup:
                self._merge_backup = None
            return
        while self.merged_adapters:
            self._add_delta_(self.merged_adapters.pop(), -1.0)

    @torch.no_grad()
    def remerge(self, names: Sequence[str], backup: bool = False, check: bool = True) -> None:
        """Switch the merged adapters to ``names`` in place (the weight's storage is reused).

        When every adapter involved has low-rank factors this is *one* GEMM per layer:
        ``W ← W + [s_b B_b | −s_a B_a] [A_b; A_a]`` (without a backup) or
        ``W ← W0 + [s_b B_b] [A_b]`` (from the backup) — the weight is read and written
        once.  Otherwise ``unmerge`` then ``merge``.
        """
        target = [n for n in dict.fromkeys(names) if n in self.adapters]
        if target == self.merged_adapters:
            return
        for name in target if check else ():
            self._check_finite(name)
        has_backup = self._merge_backup is not None
        parts = [(n, 1.0) for n in target]
        if not has_backup:
            parts = [(n, -1.0) for n in reversed(self.merged_adapters)] + parts
        fused = [self._fused_parts(n) for n, _ in parts] if parts else []
        if (has_backup or not backup) and parts and all(f is not None for f in fused):
            # [s_b B_b | −s_a B_a] as one cat and one multiply by the column scales (the same fp32 products
            # as scaling each factor: −(s·x) = (−s)·x exactly)
            raw_up = torch.cat([f[0] for f in fused], dim=1)
            scales = [f[2] * sign for f, (_, sign) in zip(fused, parts) for _ in range(f[0].shape[1])]
            up = (raw_up * torch.tensor(scales, dtype=raw_up.dtype, device=raw_up.device)).to(self.base_weight.dtype)
            down = torch.cat([f[1] for f in fused], dim=0).to(self.base_weight.dtype)
            self._addmm_factors_(up, down, 1.0, self._merge_backup)
            self.merged_adapters[:] = target
            return
        if has_backup and target:
            self.merged_adapters.clear()
            self._add_delta_(target[0], 1.0, source=self._merge_backup)
            self.merged_adapters.append(target[0])
            self.merge(target[1:], check=False)
            return
        self.unmerge(keep_backup=backup)
        self.merge(target, backup=backup, check=False)

    def _fused_factors(self, name: str):
        """``(up (O,R), down (R,F))`` with the scale folded in, for a fused in-place ``addmm``; or None."""
        weight = self.base_weight
        if weight.dtype not in (torch.float32, torch.float64) or not weight.is_contiguous():
            return None
        if not self.adapters[name].merges_additively:
            return None
        factors = adapter_factors(self.adapters[name])
        if factors is None:
            return None
        flat = factors.flattened()
        return flat.up.to(weight.dtype), flat.modes[0].to(weight.dtype)

    def _fused_parts(self, name: str):
        """``(up (O,R), down (R,F), scale)`` unscaled, in the adapter's dtype: :meth:`_fused_factors` is
        ``(up·scale, down)`` cast to the weight's dtype; or None when that is None."""
        weight = self.base_weight
        if weight.dtype not in (torch.float32, torch.float64) or not weight.is_contiguous():
            return None
        if not self.adapters[name].merges_additively:
            return None
        found = adapter_factors_and_scale(self.adapters[name])
        if found is None:
            return None
        flat = found[0].flattened()
        return flat.up, flat.modes[0], found[1]

    def _sparse_delta(self, name: str):
        """``(flat indices, values)`` with ``ΔW.reshape(-1)[indices] = values`` (canonical layout) for an
        adapter whose increment is sparse (it defines ``sparse_delta()``); or None."""
        return self.adapters[name].sparse_delta()

    def finiteness_tensors(self, name: str) -> tuple[torch.Tensor, ...]:
        """The tensors whose values must be finite for adapter ``name`` to merge: its factors (scale folded
        in), its sparse values, or its ``ΔW``."""
        tensors = self._fused_factors(name)
        if tensors is None:
            sparse = self._sparse_delta(name)
            tensors = (sparse[1],) if sparse is not None else (self.adapters[name].delta_weight(),)
        return tuple(tensors)

    def _check_finite(self, name: str) -> None:
        if not all(all_finite(t) for t in self.finiteness_tensors(name)):
            raise LavaError(f"adapter {name!r} has non-finite values; refusing to merge it into the base weight")

    def _add_delta_(self, name: str, alpha: float, source: torch.Tensor | None = None) -> None:
        """``W ← (source or W) + alpha·ΔW_name`` in place; low-rank factors go through one ``addmm``,
        sparse increments through one scatter-add of their values (no ``ΔW`` temporary either way),
        other methods through ``delta_weight()``."""
        weight = self.base_weight.data
        if not self.adapters[name].merges_additively:  # e.g. DoRA: W ← g ⊙ (W + ΔW)
            if source is not None:
                weight.copy_(source)
            self.adapters[name].merge_into_(self.ops.to_base_layout(weight), alpha)
            return
        fused = self._fused_factors(name)
        if fused is not None:
            self._addmm_factors_(fused[0], fused[1], alpha, source)
            return
        sparse = self._sparse_delta(name)
        if sparse is not None:
            if source is not None:
                weight.copy_(source)
            # the layout maps are transposes (their own inverses): this is W seen in the canonical layout
            _scatter_add_(self.ops.to_base_layout(weight), sparse[0], sparse[1], alpha)
            return
        delta = self.delta_in_base_layout(name)
        if source is None:
            weight.add_(delta, alpha=alpha)
        else:
            torch.add(source, delta, alpha=alpha, out=weight)

    def _aligned_base_weight(self) -> torch.Tensor:
        """The base weight's data, first moved (once, same values) to storage of its own at a 64-byte
        aligned address when it is not there: weights loaded from safetensors are memory-mapped at the
        file's offsets, and CPU BLAS runs an in-place GEMM into such an unaligned matrix about 3x slower
        (MiniLM's 37 layers: 53 ms vs 17 ms per switch).  Writing a memory-mapped weight copies its pages
        anyway, so this costs no extra memory."""
        weight = self.base_weight
        data = weight.data
        if data.device.type == "cpu" and type(data) is torch.Tensor and data.data_ptr() % 64:  # plain CPU tensors
            weight.data = data = data.clone()
        return data

    def _addmm_factors_(self, up: torch.Tensor, down: torch.Tensor, alpha: float, source: torch.Tensor | None) -> None:
        """``W ← (source or W) + alpha·up@down`` (canonical ``O × F``) as one in-place GEMM."""
        weight = self._aligned_base_weight()
        if isinstance(self.ops, (GPT2Conv1DOps, EmbeddingOps)):  # base layout is the transpose
            mat, src, a, b = weight, source, down.T, up.T
        else:
            mat = weight.view(weight.shape[0], -1)
            src, a, b = (None if source is None else source.view(source.shape[0], -1)), up, down
        if src is None:
            mat.addmm_(a, b, alpha=alpha)
        else:
            torch.addmm(src, a, b, alpha=alpha, out=mat)

    # ------------------------------------------------------------------ forward
    def _unmerged_active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.adapters and a not in self.merged_adapters]

    def forward(self, x, *args, **kwargs):
        if self.sibling_group is not None and not args and not kwargs and not torch.compiler.is_compiling():
            out = self.sibling_group.forward(self, x)  # shared-input fusion: one node for q/k/v, gate/up
            if out is not None:
                return out
        if self.disabled:
            if self.merged_adapters:
                raise LavaError("adapters are merged into this layer; unmerge before disabling them")
            return self.base_layer(x, *args, **kwargs)
        if self.mixed_adapter_names is not None:
            return self._forward_mixed(x, self.mixed_adapter_names)
        active = self._unmerged_active()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        return self._forward_with(x, active)

    def _forward_with(self, x, names: Sequence[str]):
        """Output of the layer with the adapters ``names`` applied (all samples).

        An adapter may pick its path per input shape (``uses_weight_path_for(x, layer)``,
        e.g. LAVA's conv cost model); others answer ``uses_weight_path()``.
        """
        weight_path = [n for n in names if _wants_weight_path(self.adapters[n], x, self)]
        rest = [n for n in names if n not in weight_path]
        if weight_path:
            weight = self.base_weight
            for n in weight_path:
                weight = weight + self.ops.to_base_layout(self.adapters[n].delta_weight()).to(weight.dtype)
            out = self.ops.forward_with_weight(self.base_layer, x, weight)
        else:
            out, rest = self._base_and_first_fused(x, rest)
        for n in rest:
            out = self.adapters[n](x, out, self)
        return out

    def _base_and_first_fused(self, x, names: list[str]):
        """The base output, fused with the first adapter's term where that adapter offers it.

        On a frozen plain ``nn.Linear`` the first adapter's ``fused_linear(x, W, b)`` may run
        base and adapter as one autograd node (low rank: :mod:`lava_peft.fused_linear`;
        sparse: :mod:`lava_peft.fused_sparse`); returns ``(out, names left)``.
        """
        base = frozen_linear_weight(self.base_layer) if names else None
        if base is not None and fusable(x, base[0]):
            out = self.adapters[names[0]].fused_linear(x, base[0], base[1])
            if out is not None:
                return out, names[1:]
        return self.base_layer(x), names

    def _forward_mixed(self, x, names):
        """One adapter per sample (dim 0), grouped: one pass per distinct adapter, no per-sample loop.

        Factored adapters: the base op runs once on every sample that does not use a
        weight-path adapter, then each adapter adds its contribution on its rows.
        Weight-path adapters (conv kernels): their rows run one op with ``W0 + ΔW_a``
        (exactly what a single-adapter run does; every sample still costs one base op).
        """
        if self.merged_adapters:
            raise LavaError("mixed-adapter batches need unmerged adapters; call model.unmerge_adapter() first")
        plan = names if isinstance(names, MixedBatch) else MixedBatch(names)
        groups = plan.groups(x.shape[0], x.device)
        if len(groups) == 1:
            name = groups[0][0]
            return self._forward_with(x, [name]) if name in self.adapters else self.base_layer(x)
        grouped = grouped_lowrank_forward(self, x, plan)  # low-rank adapters: two batched GEMMs (mixed_batch.py)
        if grouped is not None:
            return grouped
        weight_path = [(n, idx) for n, idx in groups if n in self.adapters and self.adapters[n].uses_weight_path()]
        plain = [(n, idx) for n, idx in groups if not (n in self.adapters and self.adapters[n].uses_weight_path())]
        if not weight_path:
            out = self.base_layer(x)
            for name, idx in plain:
                if name in self.adapters:
                    sub = self.adapters[name](x.index_select(0, idx), out.index_select(0, idx), self)
                    out = out.index_copy(0, idx, sub.to(out.dtype))
            return out
        pieces = []
        if plain:
            plain_idx = torch.cat([idx for _, idx in plain])
            x_plain = x.index_select(0, plain_idx)
            base = self.base_layer(x_plain)
            start = 0
            for name, idx in plain:
                stop = start + idx.numel()
                part = base[start:stop]
                if name in self.adapters:
                    part = self.adapters[name](x_plain[start:stop], part, self)
                pieces.append((idx, part))
                start = stop
        for name, idx in weight_path:
            pieces.append((idx, self._forward_with(x.index_select(0, idx), [name])))
        first = pieces[0][1]
        out = first.new_empty((x.shape[0], *first.shape[1:]))
        for idx, part in pieces:
            out = out.index_copy(0, idx, part.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active_adapters}, merged={self.merged_adapters}"


class SavedModuleWrapper(nn.Module):
    """``modules_to_save``: a module trained fully, with one trainable copy per adapter.

    The original stays frozen and is used when no adapter owning a copy is active.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self.active_copy: str | None = None
        self.disabled = False
        self.mixed_adapter_names: MixedBatch | None = None
        for p in original.parameters():
            p.requires_grad_(False)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original_module":
                raise
            return getattr(self.original_module, name)

    def add(self, name: str) -> None:
        import copy

        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone

    def remove(self, name: str) -> None:
        if name in self.copies:
            del self.copies[name]
        if self.active_copy == name:
            self.active_copy = None

    def current(self) -> nn.Module:
        if not self.disabled and self.active_copy is not None and self.active_copy in self.copies:
            return self.copies[self.active_copy]
        return self.original_module

    def forward(self, *args, **kwargs):
        if self.mixed_adapter_names is not None and not self.disabled:
            return self._forward_mixed(self.mixed_adapter_names, args, kwargs)
        return self.current()(*args, **kwargs)

    def _forward_mixed(self, plan, args, kwargs):
        """Rows of adapter ``a`` go through ``a``'s copy (the original for others): tensors whose
        first dimension is the batch are split by rows; the output (a tensor, or a tuple/list
        of tensors) is reassembled in the original row order."""
        batch = next((t.shape[0] for t in (*args, *kwargs.values()) if torch.is_tensor(t) and t.dim() > 0), None)
        if batch is None:
            raise LavaError("modules_to_save module in a mixed batch got no tensor input with a batch dimension")
        groups = plan.groups(batch, next(t for t in (*args, *kwargs.values()) if torch.is_tensor(t)).device)
        owned = [(n, idx) for n, idx in groups if n in self.copies]
        if not owned:
            return self.original_module(*args, **kwargs)
        if len(groups) == 1:
            return self.copies[owned[0][0]](*args, **kwargs)

        def rows(value, idx):
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
                return value.index_select(0, idx)
            return value

        def scatter(out, part, idx):
            if torch.is_tensor(out):
                return out.index_copy(0, idx, part.to(out.dtype))
            if isinstance(out, (tuple, list)) and all(torch.is_tensor(o) for o in out):
                return type(out)(scatter(o, p, idx) for o, p in zip(out, part))
            raise LavaError(
                f"modules_to_save module {type(self.original_module).__name__} returns {type(out).__name__}; "
                "mixed-adapter batches support modules returning tensors or tuples of tensors"
            )

        out = self.original_module(*args, **kwargs)
        for name, idx in owned:
            part = self.copies[name](*(rows(a, idx) for a in args), **{k: rows(v, idx) for k, v in kwargs.items()})
            out = scatter(out, part, idx)
        return out
