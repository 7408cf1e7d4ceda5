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

Merging adds ``ΔW`` into the base weight in place; unmerging subtracts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterNameError, LavaError

BASE_NAME = "__base__"
"""Name that selects the plain base model for a sample in a mixed-adapter batch."""


@dataclass(frozen=True)
class LayerSpec:
    """What an adapter needs to know about the layer it adapts.

    ``kind`` is ``"linear"`` (Linear and GPT-2 Conv1D), ``"conv"`` or ``"embedding"``.
    ``in_dim`` is per group for grouped convolutions.
    """

    kind: str
    out_dim: int
    in_dim: int
    kernel_size: tuple[int, ...] = ()
    groups: int = 1
    padding_idx: int | None = None

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        return (self.out_dim, self.in_dim, *self.kernel_size)


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
        out = x @ weight
        return out + layer.bias if with_bias and layer.bias is not None else out


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
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def delta_in_base_layout(self, name: str) -> torch.Tensor:
        """``ΔW`` of adapter ``name`` in the base weight's layout and dtype."""
        delta = self.adapters[name].delta_weight()
        return self.ops.to_base_layout(delta).to(self.base_weight.dtype)

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, names: Sequence[str] | None = None) -> None:
        """Add ``ΔW`` of ``names`` (default: the active adapters) into the base weight."""
        names = self.active_adapters if names is None else names
        for name in names:
            if name in self.merged_adapters or name not in self.adapters:
                continue
            delta = self.delta_in_base_layout(name)
            if not torch.isfinite(delta).all():
                raise LavaError(f"adapter {name!r} has non-finite values; refusing to merge it into the base weight")
            self.base_weight.data.add_(delta)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged ``ΔW`` (in reverse order of merging)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.base_weight.data.sub_(self.delta_in_base_layout(name))

    # ------------------------------------------------------------------ forward
    def _unmerged_active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.adapters and a not in self.merged_adapters]

    def forward(self, x, *args, **kwargs):
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
        """Output of the layer with the adapters ``names`` applied (all samples)."""
        weight_path = [n for n in names if self.adapters[n].uses_weight_path()]
        if weight_path:
            weight = self.base_weight
            for n in weight_path:
                weight = weight + self.ops.to_base_layout(self.adapters[n].delta_weight()).to(weight.dtype)
            out = self.ops.forward_with_weight(self.base_layer, x, weight)
        else:
            out = self.base_layer(x)
        for n in names:
            if n not in weight_path:
                out = self.adapters[n](x, out, self)
        return out

    def _forward_mixed(self, x, names: Sequence[str]):
        """One adapter per sample (dim 0): one pass per distinct adapter, no per-sample loop."""
        if self.merged_adapters:
            raise LavaError("mixed-adapter batches need unmerged adapters; call model.unmerge_adapter() first")
        if len(names) != x.shape[0]:
            raise LavaError(
                f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} samples; "
                "give one adapter name per sample (use '__base__' for the base model)"
            )
        out = self.base_layer(x)
        for name in dict.fromkeys(names):
            if name == BASE_NAME or name not in self.adapters:
                continue
            idx = torch.tensor([i for i, n in enumerate(names) if n == name], device=out.device)
            sub_out = self._forward_with(x.index_select(0, idx), [name])
            out = out.index_copy(0, idx, sub_out.to(out.dtype))
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
        return self.current()(*args, **kwargs)
