"""Bottleneck adapters — Houlsby, Pfeiffer, AdaptFormer — and their 1-bit variants (module adapters).

A bottleneck adapter is a small MLP on a module's features (the second adapter kind,
:class:`~.base.ModuleAdapter`: it transforms a module's output, it has no ``ΔW``)::

    z = LN(source)            (optional LayerNorm with its own affine parameters)
    a = act(z Dᵀ + d)         D: (r, in)  "Down",   d: (r,)
    u = drop(a) Uᵀ + b        U: (out, r) "Up",     b: (out,)    (drop: dropout_position="hidden")
    y' = y + s·u

* **sequential** (``mode="sequential"``; Houlsby, Pfeiffer): ``source = y``, the module's output
  (an adapter *after* the sublayer: ``y' = y + s·Up(act(Down(y)))``);
* **parallel** (``mode="parallel"``; AdaptFormer): ``source = x``, the module's input
  (``y' = MLP(x) + s·Up(act(Down(x)))``).

On ``(N, C, *spatial)`` feature maps (CNN blocks) ``D`` and ``U`` act on the channel
dimension: a 1×1-convolution bottleneck.  ``U = 0``, ``b = 0`` at init (``init="zero_up"``), so
the model starts as the base model; ``D`` has ``nn.Linear``'s Kaiming-uniform init and ``d = 0``
(the MoSA reference's init).

===============  ============================  ===========  ======  ===========
method           default placement             mode         act     scale ``s``
===============  ============================  ===========  ======  ===========
``houlsby``      attention + FFN output        sequential   GELU    1.0
``pfeiffer``     FFN output                    sequential   ReLU    1.0
``adaptformer``  MLP block                     parallel     ReLU    0.1
===============  ============================  ===========  ======  ===========

(placement keywords: :mod:`lava_peft.module_layers`.)

**1 bit** (``bits=k``, Jie et al. ICCV 2023, "Bi-AdaptFormer"): ``D`` and ``U`` are trained
quantization-aware, ``Q_k`` of :mod:`lava_peft.lowbit` (standardize, Gaussian codebook —
``codebook="exact"`` or the reference's 500-step ``"reference"`` values —, straight-through
gradient); biases (``bias=False`` in the reference) stay fp32.  :func:`bi_adaptformer` gives the
reference's setting (no bias, no LayerNorm, ReLU, dropout 0.1 between act and Up, parallel to
the MLP, fed ``x``).  ``init="paper"`` draws ``U`` from N(0, 1e-3²) truncated to ±2e-3 as the
reference (which cannot standardize a zero matrix; ours maps ``σ = 0`` to exactly 0, so the
default ``"zero_up"`` also works at 1 bit).  **Bi-Head** (``binary_head="classifier"``): the
named output head is replaced by a new head ``y' = x Q_k(W)ᵀ`` (no bias, ``head_bits``,
default 1; ``nn.Linear`` init), trained and stored bit-packed with the adapter.

**Files.**  The state dict is the file: ``down_weight``, ``down_bias``, ``up_weight``,
``up_bias``, ``ln_weight``, ``ln_bias`` (fp32).  Quantized weights are stored as
``<name>.codes`` (uint8, bit-packed, ``ceil(n·k/8)`` bytes), ``<name>.stats`` (fp32 ``[μ, σ]``)
and ``<name>.shape`` (int64) instead of their fp32 latent (``keep_latent=True`` also stores
it); an adapter loaded from codes alone is frozen to them (inference, re-saving bit-identical).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, register_method
from ..errors import LavaConfigError, UnsupportedLayerError
from ..lowbit import check_codebook
from .base import ModuleAdapter, ModuleSpec
from .bottleneck_quant import QuantizedTensors

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "identity": lambda t: t}
MODES = ("parallel", "sequential")
INITS = ("zero_up", "paper")
DROPOUT_POSITIONS = ("hidden", "input")
SCALE_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
"""The scales the 1-bit reference searches per task (pick one by validation accuracy)."""


@dataclass
class BottleneckConfig(AdapterConfig):
    """A bottleneck adapter (see the module docstring); use :class:`HoulsbyConfig`,
    :class:`PfeifferConfig` or :class:`AdaptFormerConfig`, which only change the defaults.

    Args:
        target_modules: a placement keyword (``"mlp"``, ``"ffn-output"``, ``"attention-output"``,
            ``"attention-output+ffn-output"``, ``"blocks"``), module names/suffixes, ``type:`` entries
            (e.g. ``[InvertedResidual]``) or a regex; any module, not only layers.
        r: bottleneck size (hidden units of the adapter MLP).
        scale: ``s``, the factor on the adapter's output (``alpha`` is not used).
        mode: ``"parallel"`` (reads the module's input) or ``"sequential"`` (reads its output).
        activation: ``"relu"``, ``"gelu"``, ``"silu"``, ``"tanh"`` or ``"identity"``.
        layer_norm: a LayerNorm (own affine parameters) on the adapter's input.
        bias: biases on Down and Up.
        dropout: dropout probability; ``dropout_position``: ``"hidden"`` (between act and Up, the
            reference) or ``"input"`` (on the adapter's input).
        init: ``"zero_up"`` (``U = 0``: the model starts as the base model) or ``"paper"`` (``U`` from a
            ±2e-3-truncated N(0, 1e-3²), the 1-bit reference's init; the output changes at init).
        bits: ``None`` (fp32) or 1..8: Down/Up trained quantization-aware and stored bit-packed.
        codebook: ``"exact"`` or ``"reference"`` (:func:`lava_peft.lowbit.reference_codebook`).
        keep_latent: also store the fp32 latent of quantized weights (to resume training).
        binary_head: name of an output head to replace by a ``head_bits``-bit head (Bi-Head), or ``None``.
    """

    cli_help: ClassVar[str | None] = None
    peft_export_refusal: ClassVar[str | None] = (
        "adapter {name!r} is a bottleneck (module) adapter; HF PEFT has no bottleneck adapters and it cannot be "
        "written as LoRA (it is nonlinear)")

    target_modules: Any = "mlp"
    r: int = 16
    scale: float = 0.1
    mode: str = "parallel"
    activation: str = "relu"
    layer_norm: bool = False
    bias: bool = True
    dropout_position: str = "hidden"
    init: str = "zero_up"
    bits: int | None = None
    codebook: str = "exact"
    keep_latent: bool = False
    binary_head: str | None = None
    head_bits: int = 1

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        checks = [("mode", MODES), ("activation", tuple(ACTIVATIONS)), ("init", INITS),
                  ("dropout_position", DROPOUT_POSITIONS)]
        for field_name, allowed in checks:
            if getattr(self, field_name) not in allowed:
                raise LavaConfigError(f"{name}.{field_name} must be one of {allowed}; got {getattr(self, field_name)!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise LavaConfigError(f"{name}.scale must be a finite number (the factor on the adapter output); "
                                  f"got {self.scale!r}")
        for flag in ("layer_norm", "bias", "keep_latent"):
            if not isinstance(getattr(self, flag), bool):
                raise LavaConfigError(f"{name}.{flag} must be True or False; got {getattr(self, flag)!r}")
        for field_name in ("bits", "head_bits"):
            value = getattr(self, field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8):
                raise LavaConfigError(f"{name}.{field_name} must be an integer from 1 to 8 (bits per stored "
                                      f"weight){' or None (fp32)' if field_name == 'bits' else ''}; got {value!r}")
        if self.head_bits is None:
            raise LavaConfigError(f"{name}.head_bits must be an integer from 1 to 8; got None")
        check_codebook(self.codebook)
        if self.binary_head is not None and (not isinstance(self.binary_head, str) or not self.binary_head):
            raise LavaConfigError(f"{name}.binary_head must be a module name (e.g. 'classifier') or None; "
                                  f"got {self.binary_head!r}")


@dataclass
class HoulsbyConfig(BottleneckConfig):
    """Houlsby et al. (2019): sequential adapters after the attention and after the FFN sublayer."""

    target_modules: Any = "attention-output+ffn-output"
    scale: float = 1.0
    mode: str = "sequential"
    activation: str = "gelu"


@dataclass
class PfeifferConfig(BottleneckConfig):
    """Pfeiffer et al. (2021): one sequential adapter after the FFN sublayer."""

    target_modules: Any = "ffn-output"
    scale: float = 1.0
    mode: str = "sequential"
    activation: str = "relu"


@dataclass
class AdaptFormerConfig(BottleneckConfig):
    """Chen et al. (2022): a scaled parallel adapter beside the MLP block (``s = 0.1``)."""


def bi_adaptformer(bits: int = 1, r: int = 32, scale: float = 1.0, binary_head: str | None = None,
                   **kwargs) -> AdaptFormerConfig:
    """The reference's Bi-AdaptFormer: ``bits``-bit Down/Up without biases, no LayerNorm, ReLU, dropout 0.1
    between act and Up, parallel to the MLP and fed its input; ``binary_head`` adds the Bi-Head.
    ``scale`` is searched per task in the reference over :data:`SCALE_GRID`."""
    settings = dict(bits=bits, r=r, scale=scale, bias=False, layer_norm=False, activation="relu", dropout=0.1,
                    dropout_position="hidden", mode="parallel", binary_head=binary_head)
    settings.update(kwargs)
    return AdaptFormerConfig(**settings)


# ================================================================================= adapters
def features_last(t: torch.Tensor, kind: str) -> torch.Tensor:
    return t.movedim(1, -1).contiguous() if kind == "channels" else t


def features_back(t: torch.Tensor, kind: str) -> torch.Tensor:
    return t.movedim(-1, 1) if kind == "channels" else t


class BottleneckAdapter(QuantizedTensors, ModuleAdapter):
    """``y' = y + s·Up(drop(act(Down(LN(source)))))`` on one module (module docstring)."""

    def __init__(self, spec: ModuleSpec, config: BottleneckConfig, module_name: str):
        super().__init__(spec, config, module_name)
        self.mode = config.mode
        self.reads_input = config.mode == "parallel"
        in_dim = spec.in_dim if self.reads_input else spec.out_dim
        self.in_features = in_dim
        r = config.rank_for(module_name)
        self.r, self.scale = r, float(config.scale)
        self.activation = config.activation
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.dropout_position = config.dropout_position
        self.down_weight = nn.Parameter(torch.empty(r, in_dim))
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
        self.up_weight = nn.Parameter(torch.zeros(spec.out_dim, r))
        if config.init == "paper":
            nn.init.trunc_normal_(self.up_weight, std=1e-3, a=-2e-3, b=2e-3)
        if config.bias:
            self.down_bias = nn.Parameter(torch.zeros(r))
            self.up_bias = nn.Parameter(torch.zeros(spec.out_dim))
        else:
            self.down_bias = self.up_bias = None
        if config.layer_norm:
            self.ln_weight = nn.Parameter(torch.ones(in_dim))
            self.ln_bias = nn.Parameter(torch.zeros(in_dim))
        self.layer_norm = config.layer_norm
        self.setup_quantization(("down_weight", "up_weight") if config.bits else (), config.bits, config.codebook,
                                config.keep_latent)

    # the weights as used (quantized when ``bits``); subclasses (MoSA) pick copies here
    def down(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.effective("down_weight"), self.down_bias

    def up(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.effective("up_weight"), self.up_bias

    def bottleneck(self, source: torch.Tensor) -> torch.Tensor:
        """``Up(drop(act(Down(LN(source)))))`` on features-last ``source`` (no scale)."""
        dtype = source.dtype
        z = source
        if self.layer_norm:
            z = F.layer_norm(z, (z.shape[-1],), self.ln_weight.to(dtype), self.ln_bias.to(dtype))
        if self.dropout_position == "input":
            z = self.dropout(z)
        dw, db = self.down()
        a = ACTIVATIONS[self.activation](F.linear(z, dw.to(dtype), None if db is None else db.to(dtype)))
        if self.dropout_position == "hidden":
            a = self.dropout(a)
        uw, ub = self.up()
        return F.linear(a, uw.to(dtype), None if ub is None else ub.to(dtype))

    def forward(self, x, out):
        source = x if self.reads_input else out
        kind = self.spec.kind
        src = features_last(source, kind)
        if src.shape[-1] != self.in_features or (self.reads_input and source.shape[2:] != out.shape[2:]
                                                          and kind == "channels"):
            raise UnsupportedLayerError(
                f"the {self.mode} adapter expects {self.in_features} features"
                f"{' at the output resolution' if kind == 'channels' else ''}, got a tensor of shape "
                f"{tuple(source.shape)}; use mode='sequential' (adapts the output) or target another module")
        delta = features_back(self.bottleneck(src), kind)
        return out + delta.to(out.dtype) * self.scale

    @classmethod
    def check_module(cls, spec: ModuleSpec, config, module_name: str) -> None:
        if config.mode == "parallel" and spec.in_dim is None:
            raise UnsupportedLayerError(
                f"{module_name} ({spec.module_type}) takes no feature tensor as input, so a parallel adapter cannot "
                "read it; use mode='sequential' or target another module")

    @classmethod
    def for_module(cls, spec: ModuleSpec, config, module_name: str) -> ModuleAdapter:
        head = config.binary_head
        if head is not None and (module_name == head or module_name.endswith("." + head)):
            return BinaryHeadAdapter(spec, config, module_name)
        return cls(spec, config, module_name)

    @classmethod
    def extra_targets(cls, config) -> list[str]:
        return [config.binary_head] if config.binary_head else []

    def extra_repr(self) -> str:
        return (f"{self.mode}, r={self.r}, scale={self.scale:g}, act={self.activation}, "
                f"bits={self.bits or 32}")


class BinaryHeadAdapter(QuantizedTensors, ModuleAdapter):
    """Bi-Head: the head's output is replaced by ``x Q_k(W)ᵀ`` (``W`` trained, ``nn.Linear`` init, no bias)."""

    reads_input = True

    def __init__(self, spec: ModuleSpec, config: BottleneckConfig, module_name: str):
        super().__init__(spec, config, module_name)
        if spec.in_dim is None or spec.kind != "sequence":
            raise UnsupportedLayerError(f"binary_head {module_name!r} must be a Linear head; got {spec.module_type}")
        self.head_weight = nn.Parameter(torch.empty(spec.out_dim, spec.in_dim))
        nn.init.kaiming_uniform_(self.head_weight, a=math.sqrt(5))
        self.setup_quantization(("head_weight",), config.head_bits, config.codebook, config.keep_latent)

    def forward(self, x, out):
        return F.linear(x, self.effective("head_weight").to(x.dtype)).to(out.dtype)

    def merge_refusal(self) -> str:
        return ("a binary head replaces the head's output with a quantized weight; keep it unmerged (its weight "
                "can be read with adapter.effective('head_weight'))")


register_method("houlsby", HoulsbyConfig, BottleneckAdapter)
register_method("pfeiffer", PfeifferConfig, BottleneckAdapter)
register_method("adaptformer", AdaptFormerConfig, BottleneckAdapter)

__all__ = ["AdaptFormerConfig", "BinaryHeadAdapter", "BottleneckAdapter", "BottleneckConfig", "HoulsbyConfig",
           "PfeifferConfig", "SCALE_GRID", "bi_adaptformer"]
