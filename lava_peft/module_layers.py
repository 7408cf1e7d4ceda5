"""Hosts for the second adapter kind: module adapters that transform a module's *output*.

A weight adapter (:class:`~lava_peft.methods.base.DeltaAdapter`) lives in an
:class:`~lava_peft.layers.AdaptedLayer` that *replaces* a layer.  A module adapter
(:class:`~lava_peft.methods.base.ModuleAdapter`) transforms the output of any module — a
transformer block, its MLP, an output projection, a CNN block — and must leave the names of
everything inside that module unchanged (LoRA on ``attention.self.query`` keeps working
inside a block that also carries an adapter).  So the module is not wrapped: a
:class:`ModuleAdapterHost` is attached to it as the child ``lava_module_adapters`` (its
tensors are saved under the module's own path) and a forward hook applies the active
adapters::

    y = module(*args, **kwargs)                 (the module runs unchanged)
    h = first tensor of y                       (a tuple output keeps its other entries)
    h ← adapter_a(x, h) for each active a       (x = the module's first tensor input)

Disabled, or with no active adapter, the hook returns ``y`` untouched.  In a mixed batch
the rows of adapter ``a`` get ``adapter_a(x[rows], h[rows])`` and the other rows keep ``h``.

Placement keywords (``target_modules`` of a module adapter; names, types and regexes work
as for weight adapters):

==========================  ===============================================================
``"attention-output"``      the attention output projection (BERT/MiniLM/ViT
                            ``attention.output.dense``, GPT-2 ``attn.c_proj``, Llama
                            ``self_attn.o_proj``, timm-style ``attn.proj``)
``"ffn-output"``            the feed-forward output projection (BERT/ViT ``layer.N.output.dense``,
                            GPT-2 ``mlp.c_proj``, Llama ``mlp.down_proj``, timm ``mlp.fc2``)
``"attention-output+ffn-output"``  both (Houlsby's two adapters per block)
``"mlp"``                   the MLP block (GPT-2 / Llama / timm ``mlp``); BERT-style layers
                            split their FFN over two modules with the residual LayerNorm
                            inside, so there the whole layer (``encoder.layer.N``) is used
``"blocks"``                every residual block: transformer layers and CNN blocks
                            (MobileNetV2 ``InvertedResidual``, ResNet ``BasicBlock``/``Bottleneck``)
==========================  ===============================================================
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import LavaError, UnsupportedLayerError
from .layers import MixedBatch, layer_ops, walk_modules
from .methods.base import ModuleSpec

HOST_ATTRIBUTE = "lava_module_adapters"
"""Child name under which a module carries its :class:`ModuleAdapterHost`."""

_ATTENTION_OUTPUT = ("attention.output.dense", "attn.c_proj", "self_attn.o_proj", "attn.proj", "attention.out_proj")
_FFN_OUTPUT = ("mlp.c_proj", "mlp.down_proj", "mlp.fc2")
_BLOCK_TYPES = ("InvertedResidual", "BasicBlock", "Bottleneck", "GPT2Block", "LlamaDecoderLayer", "Block",
                "ViTLayer", "TransformerEncoderLayer")
PLACEMENTS = ("attention-output", "ffn-output", "attention-output+ffn-output", "mlp", "blocks")


def _is_bert_style_layer(module: nn.Module) -> bool:
    return all(hasattr(module, c) for c in ("attention", "intermediate", "output"))


def placement_selects(keyword: str, name: str, module: nn.Module) -> bool:
    """Does the placement ``keyword`` (see the module docstring) select module ``name``?"""
    if keyword == "attention-output+ffn-output":
        return placement_selects("attention-output", name, module) or placement_selects("ffn-output", name, module)
    dotted = "." + name
    if keyword == "attention-output":
        return dotted.endswith(tuple("." + s for s in _ATTENTION_OUTPUT))
    if keyword == "ffn-output":
        bert_ffn = dotted.endswith(".output.dense") and not dotted.endswith(".attention.output.dense")
        return bert_ffn or dotted.endswith(tuple("." + s for s in _FFN_OUTPUT))
    if keyword == "mlp":
        return dotted.endswith(".mlp") or _is_bert_style_layer(module)
    if keyword == "blocks":
        return type(module).__name__ in _BLOCK_TYPES or _is_bert_style_layer(module)
    raise LavaError(f"unknown placement {keyword!r}; use one of {PLACEMENTS}")


# ------------------------------------------------------------------------------------ spec
def _leaves(module: nn.Module):
    return [(n, m) for n, m in module.named_modules() if layer_ops(m) is not None and HOST_ATTRIBUTE not in n]


def module_spec(module: nn.Module, name: str) -> ModuleSpec:
    """The :class:`ModuleSpec` of ``module``: output features from its last adaptable layer (in
    registration order), input features from its first; conv layers give ``"channels"``."""
    leaves = _leaves(module)
    if not leaves:
        raise UnsupportedLayerError(
            f"module {name!r} ({type(module).__name__}) contains no Linear/Conv/Conv1D/Embedding layer, so its "
            "feature size is unknown; target the block around it or its output projection instead"
        )
    first = layer_ops(leaves[0][1]).spec(leaves[0][1])
    last_module = leaves[-1][1]
    last = layer_ops(last_module).spec(last_module)
    kind = "channels" if last.kind == "conv" else "sequence"
    in_dim = None if first.kind == "embedding" else first.in_dim * (first.groups if first.kind == "conv" else 1)
    return ModuleSpec(kind, in_dim, last.out_dim, type(module).__name__)


def module_signature(module: nn.Module, name: str) -> list:
    """What the base-model fingerprint records for a module target: ``[type, in, out]``."""
    spec = module_spec(module, name)
    return [spec.module_type, spec.in_dim, spec.out_dim]


# ------------------------------------------------------------------------------------ host
def _first_tensor(args, kwargs):
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value):
            return value
    return None


class ModuleAdapterHost(nn.Module):
    """The module adapters of one module (``self.adapters[name]``), applied by a forward hook.

    Shares the host interface of :class:`~lava_peft.layers.AdaptedLayer` (``adapters``,
    ``active_adapters``, ``merged_adapters`` — always empty —, ``disabled``,
    ``mixed_adapter_names``, ``merge``/``unmerge``/``remerge``, ``release``), so the model
    drives both kinds with the same code.
    """

    def __init__(self, module: nn.Module, spec: ModuleSpec):
        super().__init__()
        self.spec = spec
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.mixed_adapter_names: MixedBatch | None = None
        object.__setattr__(self, "_module", module)  # not a child: no cycle in the module tree
        self._handle = None
        self.attach(module)

    @property
    def base_layer(self) -> nn.Module:
        return self._module

    def attach(self, module: nn.Module) -> None:
        """Hook onto ``module`` (and become its child ``lava_module_adapters``)."""
        if self._handle is not None:
            self._handle.remove()
        object.__setattr__(self, "_module", module)
        setattr(module, HOST_ATTRIBUTE, self)
        self._handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def release(self) -> nn.Module:
        """Remove the hook and the child; return the module (as it was before any adapter)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if getattr(self._module, HOST_ATTRIBUTE, None) is self:
            delattr(self._module, HOST_ATTRIBUTE)
        return self._module

    # ---------------------------------------------------------------- adapters
    def add(self, name: str, adapter: nn.Module) -> None:
        if name in self.adapters:
            raise LavaError(f"adapter {name!r} already exists on this module")
        param = next(self._module.parameters(), None)
        if param is not None:
            adapter.to(device=param.device)
        self.adapters[name] = adapter

    def remove(self, name: str) -> None:
        del self.adapters[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def fingerprint_shape(self) -> list:
        return [self.spec.module_type, self.spec.in_dim, self.spec.out_dim]

    # ---------------------------------------------------------------- merging: refused
    def merge_refusal(self, names) -> str | None:
        todo = [n for n in names if n in self.adapters]
        return self.adapters[todo[0]].merge_refusal() if todo else None

    def merge(self, names=None, backup: bool = False, check: bool = True) -> None:
        reason = self.merge_refusal(self.active_adapters if names is None else names)
        if reason:
            raise LavaError(reason)

    def remerge(self, names, backup: bool = False, check: bool = True) -> None:
        self.merge(names)

    def unmerge(self, keep_backup: bool = False) -> None:
        """Nothing is ever merged into the module."""

    def _check_finite(self, name: str) -> None:
        raise LavaError(self.adapters[name].merge_refusal())

    # ---------------------------------------------------------------- forward
    def _hook(self, module, args, kwargs, output):
        if self.disabled:
            return None
        plan = self.mixed_adapter_names
        names = [a for a in self.active_adapters if a in self.adapters] if plan is None else None
        if plan is None and not names:
            return None
        hidden, rebuild = _split_output(output, module)
        x = _first_tensor(args, kwargs)
        if plan is None:
            for name in names:
                hidden = self.adapters[name](x, hidden)
            return rebuild(hidden)
        groups = plan.groups(hidden.shape[0], hidden.device)
        out = hidden
        for name, idx in groups:
            if name not in self.adapters:
                continue
            rows_x = x.index_select(0, idx) if x is not None and x.dim() > 0 and x.shape[0] == hidden.shape[0] else x
            part = self.adapters[name](rows_x, hidden.index_select(0, idx))
            out = out.index_copy(0, idx, part.to(out.dtype))
        return rebuild(out)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active_adapters}"


def _split_output(output, module):
    """``(hidden tensor, rebuild)``: a tensor output, or the first entry of a tuple/list output."""
    if torch.is_tensor(output):
        return output, lambda h: h
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0], lambda h: type(output)((h, *output[1:]))
    raise LavaError(
        f"{type(module).__name__} returns {type(output).__name__}; module adapters need a module returning a "
        "tensor or a tuple whose first entry is the hidden states. Target a submodule instead"
    )


def module_hosts(model: nn.Module):
    """``(path of the hosting module, host)`` pairs."""
    for name, module in walk_modules(model):
        if isinstance(module, ModuleAdapterHost):
            yield name.rpartition(".")[0], module


def host_of(module: nn.Module) -> ModuleAdapterHost | None:
    found = getattr(module, HOST_ATTRIBUTE, None)
    return found if isinstance(found, ModuleAdapterHost) else None


def move_host(old: nn.Module, new: nn.Module) -> None:
    """A module carrying module adapters was wrapped (e.g. by a weight adapter's ``AdaptedLayer``):
    re-attach its host to the wrapper, so its hook keeps firing and its path stays the same."""
    host = host_of(old)
    if host is not None:
        host.release()
        host.attach(new)
