"""The protocol every weight-delta method implements.

A :class:`DeltaAdapter` lives inside an :class:`~lava_peft.layers.AdaptedLayer` and
provides

* :meth:`delta_weight` — ``ΔW`` in the canonical layout ``(O, I, *K)`` (fp32);
* :meth:`forward` — the fast unmerged path ``base_out + contribution(x)``;
* :meth:`uses_weight_path` — whether the layer should instead run one op with
  ``W0 + ΔW`` (conv kernels);
* :meth:`regularization` — an unweighted loss term for this layer, or ``None``;
* :meth:`trainable_parameter_names` — the tensors that are trained and saved.

Merge, unmerge, save/load, mixed batches and weighted combination are written once
against this protocol (``layers.py``, ``model.py``, ``io.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LavaError
from ..fused_linear import lowrank_linear


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


class DeltaAdapter(nn.Module):
    """Base class; subclasses create their parameters in ``__init__``."""

    def __init__(self, spec: LayerSpec, config, module_name: str):
        super().__init__()
        self.spec = spec
        self.r = config.rank_for(module_name)
        self.scale = config.scale_for(module_name)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def _apply(self, fn, recurse=True):
        """``model.to(bf16)`` / ``.half()`` moves adapters but keeps their floats in fp32.

        Adapter factors are tiny; fp32 keeps the optimizer stable.  The forward casts the
        factors (never the activations) to the compute dtype.
        """
        super()._apply(fn, recurse)
        for param in self.parameters():
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()
                if param.grad is not None:
                    param.grad = param.grad.float()
        return self

    # -- protocol ---------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def uses_weight_path(self) -> bool:
        """Conv kernels: materialise ``ΔW`` and run one conv (exact, and as cheap as the base conv).

        With input dropout active the increment must see the dropped input, so the
        separate (factored / delta-op) path is used instead.
        """
        return self.spec.kind == "conv" and not (self.training and isinstance(self.dropout, nn.Dropout))

    def uses_weight_path_for(self, x, layer) -> bool:
        """Like :meth:`uses_weight_path`, given the input (a method may choose per input shape)."""
        return self.uses_weight_path()

    def forward(self, x, base_out, layer):
        """Generic unmerged path: ``base_out + op(dropout(x); ΔW)`` (no bias)."""
        delta = layer.ops.to_base_layout(self.delta_weight())
        x_in = x if self.spec.kind == "embedding" else self.dropout(x)
        dtype = base_out.dtype if base_out.is_floating_point() else delta.dtype
        return base_out + layer.ops.forward_with_weight(layer.base_layer, x_in, delta.to(dtype), with_bias=False)

    def regularization(self) -> torch.Tensor | None:
        """Unweighted loss term of this layer, or ``None``; the config's ``regularization_weight()`` weighs it."""
        return None

    def batchable_regularization_factors(self) -> list[torch.Tensor] | None:
        """Tensors whose :meth:`regularization` the model computes for all layers at once with
        :meth:`batched_regularization` (one call per function), or ``None``: use :meth:`regularization`."""
        return None

    @staticmethod
    def batched_regularization(factors: list[torch.Tensor]) -> torch.Tensor | None:
        """``Σ`` of the regularization terms of the given factors of many layers (see above)."""
        return None

    def step_clock(self):
        """The training-step clock (a :class:`~lava_peft.methods.factorized.StepCounter`) this adapter shares
        with the other layers of its adapter name — the samplers of DyLoRA and MoSA — or ``None``.
        :meth:`~lava_peft.AdaptedModel.sampler_state` reads it for checkpoints."""
        return None

    def sparse_delta(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(flat indices, values)`` with ``ΔW.reshape(-1)[indices] = values`` (canonical layout, scale
        folded in) for a sparse increment, or ``None``: merges then scatter-add instead of adding ``ΔW``."""
        return None

    def effective_factors(self) -> tuple[torch.Tensor, list[torch.Tensor], float] | None:
        """``(up (O, r), [down, P_1, …], scale)``: the factors of a low-rank increment *as the layer
        call in progress uses them*, or ``None`` (not low rank).

        ``ΔW = scale · Σ_j up[:, j] ⊗ modes[0][j] ⊗ modes[1][j] ⊗ …`` (one mode: matrix form, the
        flattened kernel; ``1 + N`` modes: CP form on a conv, see :class:`~.factors.Factors`).
        LAVA's Tucker-2 conv form is ``(U (O, r_o), [V (r_i, I), core (r_o, r_i, K…)], scale)``,
        ``ΔW = scale · core ×₁ U ×₂ Vᵀ`` (recognised by the core's ``> 2`` dims).
        LoRA and LAVA return their stored parameters; the variants built on their factors
        return what they train with — DyLoRA the first ``b`` components at scale ``α/b``, MoSA a
        module's masked factors at the training scale, low-bit the fake-quantized factors — and
        every shared path (``delta_weight``, the factored forward, :meth:`linear_factors`, the
        codec's read) computes on these.  A variant may draw (DyLoRA's rank, MoSA's module) when
        called in training: call it once per layer call.
        """
        return None

    def linear_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(down (r, I), up (O, r), scale)`` with ``ΔW = scale·up·down`` on a linear layer, or ``None``.

        When given, the layer may run base and adapter as one fused autograd node
        (:mod:`lava_peft.fused_linear`); ``None`` keeps :meth:`forward`.  Low-rank adapters derive
        it from :meth:`effective_factors` (:func:`lowrank_factors`).
        """
        return None

    def fused_linear(self, x, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``x (W + ΔW)ᵀ + b`` as one fused op for a frozen plain ``nn.Linear``, or ``None`` (not offered).

        The default serves every method with :meth:`linear_factors`.
        """
        factors = self.linear_factors()
        if factors is None:
            return None
        down, up, scale = factors
        return lowrank_linear(x, weight, bias, down, up, scale)

    #: ``False`` for adapters whose merged weight is not ``W + ΔW`` (DoRA rescales it): the layer then
    #: calls :meth:`merge_into_` instead of adding ``delta_weight()`` / fused factors.
    merges_additively = True

    def merge_into_(self, canonical_weight: torch.Tensor, alpha: float) -> None:
        """Merge (``alpha=+1``) or unmerge (``-1``) into ``canonical_weight`` in place (non-additive adapters)."""
        raise NotImplementedError  # pragma: no cover - only called when merges_additively is False

    def init_from_base(self, canonical_weight: torch.Tensor) -> None:
        """Called once when the adapter is planned, with the frozen base weight in the canonical layout
        (read only); e.g. DoRA's magnitude ``‖W0‖_c``.  Default: nothing."""

    def take_base_change(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(up, down, s)`` whose product ``s·up@down`` the model's ``commit`` subtracts from the base weight,
        once (PiSSA / OLoRA: :mod:`lava_peft.methods.base_init`), else ``None`` (the default: the base stays)."""
        return None

    def initial_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(B₀, A₀)`` of an adapter initialised from the base weight (PiSSA / OLoRA), else ``None``."""
        return None

    def trainable_parameter_names(self) -> list[str]:
        return [name for name, _ in self.named_parameters()]

    @classmethod
    def for_layer(cls, spec: LayerSpec, config, module_name: str) -> "DeltaAdapter":
        """The adapter of this method for one layer (what the model builds); a method whose config picks
        one of several classes (e.g. the LoRA or LAVA variant of DyLoRA) overrides it."""
        return cls(spec, config, module_name)

    @classmethod
    def check_layer(cls, spec: LayerSpec, config, module_name: str) -> None:
        """Raise a clear error if this method cannot adapt the layer (before anything is modified)."""


def _dropout_active(adapter: "DeltaAdapter") -> bool:
    return isinstance(adapter.dropout, nn.Dropout) and adapter.dropout.training and adapter.dropout.p > 0


def lowrank_factors(adapter: "DeltaAdapter"):
    """``linear_factors()`` of a low-rank adapter from its :meth:`~DeltaAdapter.effective_factors`: only
    on linear layers, and not while its dropout is active (checked first: nothing is drawn then)."""
    if adapter.spec.kind != "linear" or _dropout_active(adapter):
        return None
    up, modes, scale = adapter.effective_factors()
    return modes[0], up, scale


def lowrank_forward(x, down: torch.Tensor, up: torch.Tensor, scale: float, adapter: "DeltaAdapter", dtype: torch.dtype,
                    base_out: torch.Tensor | None = None):
    """Factored low-rank path shared by LoRA and LAVA (``ΔW = s·up·down``), never materialising ``ΔW``.

    ``down`` is ``(r, I)``, ``up`` is ``(O, r)``.  With ``h`` the rank-``r`` hidden state

    * Linear:    ``h = dropout(x) downᵀ``  (dropout skipped, not called, when inactive);
    * Embedding: ``h = (row x of downᵀ)``;

    the result is ``base_out + h (s·up)ᵀ``: the scale is folded into the ``O×r`` factor
    (``s·up`` costs ``O·r`` multiplies instead of ``N·O`` on the activations) and the
    product is accumulated into the base output by one ``addmm`` (GEMM with β = 1),
    which removes the separate scale and add passes over the ``N×O`` output (forward and
    backward).  For 2-D activations the ``addmm_`` is in place — ``base_out`` is the fresh
    output of the base op, which its backward does not save, so this is autograd-safe and
    saves an ``N×O`` temporary; for N-d activations it is out of place (see the code).  The fp32 factors are cast once per forward to the activation dtype
    ``dtype``; the activations are never cast.  Without ``base_out`` the contribution
    ``h (s·up)ᵀ`` alone is returned.

    LoRA and LAVA (λ = 0) both call exactly this, so with equal factors they agree bit
    for bit.
    """
    if adapter.spec.kind == "embedding":
        hidden = F.embedding(x, down.T.to(dtype), padding_idx=adapter.spec.padding_idx)
    else:
        x_in = adapter.dropout(x) if _dropout_active(adapter) else x
        hidden = F.linear(x_in, down.to(dtype))
    # (s·up)ᵀ as a contiguous (r, O) matrix: the backward then computes ∂h = ∂y·(s·up) with a
    # column-major right operand, which CPU BLAS runs ~2x faster for r ≪ O than a row-major one
    up_t = (up * scale).T.contiguous().to(dtype)
    if base_out is None:
        return hidden @ up_t
    if base_out.dim() == 2 and hidden.dim() == 2 and base_out.dtype == hidden.dtype:
        return base_out.addmm_(hidden, up_t)  # in place on the tensor itself (not a view)
    # N-d activations: out of place on 2-D views.  An in-place update *through a view* would
    # make autograd rebuild the base in the backward (CopySlices: a full clone, fill and copy
    # of the output gradient), which costs more than the one copy addmm makes here.
    out_dim = up_t.shape[1]
    h2 = hidden.reshape(-1, hidden.shape[-1]).to(base_out.dtype)
    return torch.addmm(base_out.reshape(-1, out_dim), h2, up_t.to(base_out.dtype)).view(base_out.shape)


# =============================================================================== the second kind
@dataclass(frozen=True)
class ModuleSpec:
    """What a module adapter needs to know about the module whose output it transforms.

    ``kind`` is ``"sequence"`` (features in the last dimension: transformer blocks, Linear)
    or ``"channels"`` (features in dimension 1: ``(N, C, *spatial)`` conv feature maps).
    ``in_dim`` is the feature size of the module's input (what a parallel adapter reads;
    ``None`` when the input is not a feature tensor, e.g. token ids), ``out_dim`` that of its
    output.  ``module_type`` is the class name (recorded in the base-model fingerprint).
    """

    kind: str
    in_dim: int | None
    out_dim: int
    module_type: str = ""


class ModuleAdapter(nn.Module):
    """Base class of *module adapters*: adapters that transform a module's output instead of
    adding an increment ``ΔW`` to a weight (bottleneck adapters: Houlsby, Pfeiffer,
    AdaptFormer, their MoSA and 1-bit variants, a binary classifier head).

    A :class:`~lava_peft.module_layers.ModuleAdapterHost` calls, for every active adapter,
    ``out = adapter(x, out)`` where ``x`` is the first tensor input of the module and
    ``out`` its (tensor) output.  Everything else — set/disable, mixed batches, save/load,
    ``modules_to_save``, parameter counting — is the model's, as for weight adapters.

    Hooks (defaults given here):

    * ``forward(x, out)`` — the new output (e.g. ``out + s·Up(act(Down(x)))``);
    * ``reads_input`` — whether ``forward`` needs ``x`` (parallel adapters);
    * ``merge_refusal()`` — why the adapter cannot be folded into the base weights
      (a nonlinear function of the activations has no ``ΔW``); ``merge_adapter`` raises it
      and changes nothing;
    * ``regularization()``, ``batchable_regularization_factors()``, ``step_clock()`` — as
      on :class:`DeltaAdapter`;
    * ``check_module(spec, config, name)`` / ``for_module(spec, config, name)`` —
      classmethods: refuse a module, build the adapter for one module;
    * ``extra_targets(config)`` — module names the config adapts besides ``target_modules``
      (e.g. a binary classifier head);
    * ``averageable_with(other)`` — whether parameter averaging with ``other`` is defined
      (same class and tensor shapes), used by weighted combination.
    """

    reads_input: bool = False

    def __init__(self, spec: ModuleSpec, config, module_name: str):
        super().__init__()
        self.spec = spec

    def _apply(self, fn, recurse=True):
        """``model.to(bf16)`` / ``.half()`` keeps the adapter's floating-point parameters in fp32 (as
        :meth:`DeltaAdapter._apply`); the forward casts them to the activation dtype."""
        super()._apply(fn, recurse)
        for param in self.parameters():
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()
                if param.grad is not None:
                    param.grad = param.grad.float()
        return self

    def forward(self, x, out):  # pragma: no cover - abstract
        raise NotImplementedError

    def merge_refusal(self) -> str:
        return (f"{type(self).__name__} transforms the module's output with a nonlinear function, which no "
                "weight increment ΔW can express; keep it unmerged (it costs one small MLP per adapted module)")

    def delta_weight(self) -> torch.Tensor:
        raise LavaError(self.merge_refusal())

    def regularization(self) -> torch.Tensor | None:
        return None

    def batchable_regularization_factors(self) -> list[torch.Tensor] | None:
        return None

    def step_clock(self):
        return None

    def sparse_delta(self):
        return None

    def trainable_parameter_names(self) -> list[str]:
        return [name for name, _ in self.named_parameters()]

    def averageable_with(self, other: "ModuleAdapter") -> bool:
        mine, theirs = self.state_dict(), other.state_dict()
        return type(self) is type(other) and mine.keys() == theirs.keys() and all(
            mine[k].shape == theirs[k].shape for k in mine)

    @classmethod
    def extra_targets(cls, config) -> list[str]:
        return []

    @classmethod
    def for_module(cls, spec: ModuleSpec, config, module_name: str) -> "ModuleAdapter":
        return cls(spec, config, module_name)

    @classmethod
    def check_module(cls, spec: ModuleSpec, config, module_name: str) -> None:
        """Raise a clear error if this adapter cannot transform the module (before anything is modified)."""
