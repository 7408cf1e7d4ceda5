"""LAVA: the weight increment is a sum of ``r`` learnable rank-1 components.

Linear / Embedding (2 modes) — the LoRA form::

    ΔW = s · U V,        U ∈ R^{O×r} (columns u_j),  V ∈ R^{r×I} (rows v_j),  s = α/r

Convolution with N spatial modes — a CP (CANDECOMP/PARAFAC) sum on the *unflattened*
kernel ``(O, I/groups, K1, …, KN)``::

    ΔW[o, i, k1, …, kN] = s · Σ_j U[o, j] · V[j, i] · P1[j, k1] ··· PN[j, kN]

so a conv layer trains exactly ``r·(O + I/groups + K1 + … + KN)`` parameters.

Orthogonality regulariser on the output factor (``orth_factors="out"``)::

    R = ‖UᵀU − I_r‖_F²    (r ≤ O)        R = ‖UUᵀ − I_O‖_F²    (r > O: columns cannot be orthonormal)

computed in fp32 on the small Gram matrix.  The model-level loss is
``orth_lambda · mean over adapted layers of R``.  ``orth_factors="in"`` uses ``Vᵀ``
(``I×r``), ``"all"`` sums over ``U``, ``Vᵀ`` and every ``Pkᵀ``.

Initialisation (``init="orthogonal"``, default): ``U`` has orthonormal columns (QR of a
Gaussian; orthonormal rows when r > O), ``V = 0``, spatial factors ``N(0, 1/K)``
(``spatial_init="gaussian"``) or the constant ``1/√K`` (``"uniform"``).  So ``ΔW = 0``
and ``R = 0`` at step 0: the regulariser does not pull ``ΔW`` away from zero for reasons
unrelated to the task.  ``init="lora"`` is the LoRA-like alternative: ``V``
Kaiming-uniform and ``U = 0`` (then ``R(U) = r`` at step 0, so ``orth_factors``
defaults to ``"in"``).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import AdapterConfig, register_method
from ..errors import LavaConfigError
from .base import DeltaAdapter, LayerSpec, lowrank_factors, lowrank_forward
from .factors import FactorCodec, Factors, is_tucker_modes, register_factor_codec
from .cp_conv import choose_conv_path, cp_conv_separable
from . import tucker_conv as tucker
from .dora import WeightDecomposed
from .base_init import InitialisedFromBase, base_init_kind, check_base_init


@dataclass
class LavaConfig(AdapterConfig):
    """LAVA config. ``orth_lambda`` weighs the orthogonality term (0 disables it).

    ``conv_path`` chooses how an unmerged conv increment runs (all exact):
    ``"weight"`` — one conv with ``W0 + ΔW`` (ΔW built from the CP factors);
    ``"separable"`` — base conv plus the chain 1×1 (I→r) → depthwise → 1×1 (r→O), ΔW never
    built (:mod:`lava_peft.methods.cp_conv`); ``"auto"`` (default) — per layer and input
    shape, whichever the cost model in :func:`~lava_peft.methods.cp_conv.choose_conv_path`
    estimates cheaper.  It does not change results beyond floating-point rounding.

    ``factorization`` (conv layers only): ``"cp"`` (default, the CP sum above) or ``"tucker"``
    — Tucker-2, ``ΔW = s · core ×₁ U ×₂ Vᵀ`` with a dense ``(r_o, r_i, K…)`` core in rank space
    (mode ranks ``min(r, O)``, ``min(r, I/g)``; ``r_o·O + r_i·I/g + r_o·r_i·ΠK`` parameters);
    see :mod:`lava_peft.methods.tucker_conv`.  Linear layers are the same in both.
    """

    cli_help: ClassVar[str | None] = "LAVA: rank-1 components (CP on conv kernels) with an orthogonality regularizer"
    cli_options: ClassVar[dict[str, tuple]] = {
        "orth_lambda": (0.1, float, "LAVA orthogonality regularizer weight (0 disables it)"),
    }

    @classmethod
    def from_cli(cls, opts, common):
        return cls(orth_lambda=opts["orth_lambda"], **common)

    orth_lambda: float = 0.1
    orth_factors: str | None = None
    init: str = "orthogonal"
    spatial_init: str = "gaussian"
    conv_path: str = "auto"
    factorization: str = "cp"
    use_dora: bool = False  # DoRA on LAVA (conv: weight-decomposed CP or Tucker-2); lava_peft/methods/dora.py

    def __post_init__(self) -> None:
        if self.orth_factors is None:
            self.orth_factors = "in" if self.init == "lora" else "out"
        super().__post_init__()

    def regularization_weight(self) -> float:
        return self.orth_lambda

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.use_dora, bool):
            raise LavaConfigError(f"use_dora must be True or False; got {self.use_dora!r}")
        if self.orth_lambda < 0:
            raise LavaConfigError(f"orth_lambda must be >= 0; got {self.orth_lambda}")
        if self.orth_factors not in ("out", "in", "all"):
            raise LavaConfigError(f"orth_factors must be 'out', 'in' or 'all'; got {self.orth_factors!r}")
        check_base_init("LavaConfig", self.init, self.use_dora)
        if self.init not in ("orthogonal", "lora") and not base_init_kind(self.init):
            raise LavaConfigError(f"LavaConfig.init must be 'orthogonal', 'lora', 'pissa', 'pissa_niter_<K>' or 'olora'; "
                                  f"got {self.init!r}")
        if self.spatial_init not in ("gaussian", "uniform"):
            raise LavaConfigError(f"spatial_init must be 'gaussian' or 'uniform'; got {self.spatial_init!r}")
        if self.factorization not in ("cp", "tucker"):
            raise LavaConfigError(f"LavaConfig.factorization must be 'cp' or 'tucker'; got {self.factorization!r}")
        if self.conv_path not in ("auto", "weight", "separable"):
            raise LavaConfigError(f"conv_path must be 'auto', 'weight' or 'separable'; got {self.conv_path!r}")


def orthonormal_factor(rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A ``rows×cols`` matrix with orthonormal columns (rows ≥ cols) or orthonormal rows."""
    gauss = torch.randn(max(rows, cols), min(rows, cols), generator=generator)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique, sign-fixed QR
    # contiguous (QR returns column-major): same memory layout as LoRA's factors, so the
    # same kernels run and LAVA with orth_lambda=0 stays bit-identical to LoRA
    return q.contiguous() if rows >= cols else q.T.contiguous()


def orth_penalty(factor: torch.Tensor) -> torch.Tensor:
    """``‖FᵀF − I‖²_F`` for ``F`` of shape ``(d, r)``, on the smaller Gram matrix, in fp32 (or fp64)."""
    f = factor if factor.dtype == torch.float64 else factor.float()
    d, r = f.shape
    gram = f.T @ f if r <= d else f @ f.T
    eye = torch.eye(gram.shape[0], device=f.device, dtype=f.dtype)
    return (gram - eye).pow(2).sum()


def batched_orth_penalty(factors: list[torch.Tensor]) -> torch.Tensor | None:
    """``Σ_f ‖F_fᵀF_f − I‖²_F`` over many factors, batched: factors of equal shape ``(d, r)``
    are stacked to ``(L, d, r)`` (fp32) and their ``r×r`` Grams (``d×d`` when ``r > d``) come
    from one ``bmm`` per shape, instead of ~5 small ops per layer.  Equal to
    ``sum(orth_penalty(f) for f in factors)`` up to summation order."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for f in factors:
        groups.setdefault((tuple(f.shape), f.device), []).append(f)
    total = None
    for ((d, r), _), fs in groups.items():
        stacked = torch.stack([f.float() for f in fs])
        gram = stacked.transpose(1, 2) @ stacked if r <= d else stacked @ stacked.transpose(1, 2)
        eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
        term = (gram - eye).pow(2).sum()
        total = term if total is None else total + term
    return total


def cp_einsum_equation(n_spatial: int) -> str:
    """E.g. 2 spatial modes: ``'oj,ji,ja,jb->oiab'``."""
    letters = [c for c in string.ascii_lowercase if c not in "oij"][:n_spatial]
    factors = ",".join(["oj", "ji"] + [f"j{c}" for c in letters])
    return f"{factors}->oi{''.join(letters)}"


class LavaAdapter(InitialisedFromBase, DeltaAdapter):
    def __init__(self, spec: LayerSpec, config: LavaConfig, module_name: str):
        super().__init__(spec, config, module_name)
        self.base_init = base_init_kind(getattr(config, "init", None)) and config.init
        r, O, I = self.r, spec.out_dim, spec.in_dim
        self.orth_factors = config.orth_factors
        self.tucker = spec.kind == "conv" and getattr(config, "factorization", "cp") == "tucker"
        r_out, r_in = tucker.tucker_mode_ranks(spec, r) if self.tucker else (r, r)
        if config.init == "orthogonal":
            self.lava_U = nn.Parameter(orthonormal_factor(O, r_out))
            self.lava_V = nn.Parameter(torch.zeros(r_in, I))
        else:
            self.lava_U = nn.Parameter(torch.zeros(O, r_out))
            self.lava_V = nn.Parameter(torch.empty(r_in, I))
            nn.init.kaiming_uniform_(self.lava_V, a=math.sqrt(5))
            if self.base_init:  # replaced by init_from_base (PiSSA / OLoRA); draw what PEFT draws
                self.draw_like_peft_up()
        self.lava_P = nn.ParameterList()
        if self.tucker:  # Tucker-2: a dense (r_o, r_i, K…) core instead of the spatial factors
            self.lava_core = nn.Parameter(tucker.tucker_core_init(r_out, r_in, spec.kernel_size))
        for k in spec.kernel_size if not self.tucker else ():
            if config.spatial_init == "uniform":
                p = torch.full((r, k), 1.0 / math.sqrt(k))
            else:
                p = torch.randn(r, k) / math.sqrt(k)
            self.lava_P.append(nn.Parameter(p))
        self._equation = cp_einsum_equation(len(spec.kernel_size)) if spec.kind == "conv" else None
        self.conv_path = getattr(config, "conv_path", "auto")

    @classmethod
    def for_layer(cls, spec: LayerSpec, config, module_name: str) -> "LavaAdapter":
        if getattr(config, "use_dora", False) and cls is LavaAdapter:
            return DoraLavaAdapter(spec, config, module_name)
        return cls(spec, config, module_name)

    @staticmethod
    def max_rank_for(spec: LayerSpec) -> int:
        """Linear: min(O, I). Conv: the generic CP-rank bound ``Π dims / max dim``."""
        if spec.kind != "conv":
            return min(spec.out_dim, spec.in_dim)
        dims = spec.canonical_shape
        return math.prod(dims) // max(dims)

    @classmethod
    def check_layer(cls, spec: LayerSpec, config, module_name: str) -> None:
        cls.check_base_init_layer(spec, config, module_name)
        r = config.rank_for(module_name)
        tucker_conv = spec.kind == "conv" and getattr(config, "factorization", "cp") == "tucker"
        limit = tucker.tucker_max_rank(spec) if tucker_conv else cls.max_rank_for(spec)
        if r > limit:
            raise LavaConfigError(
                f"LAVA rank r={r} is larger than allowed ({limit}) for {module_name} with weight "
                f"{spec.canonical_shape}; lower r or set rank_pattern={{'{module_name}': {limit}}}"
            )

    def effective_factors(self) -> tuple[torch.Tensor, list[torch.Tensor], float]:
        """``(U, [V, P_1, …, P_N], s)``: the stored factors (variants override this, see :class:`DeltaAdapter`).

        Tucker-2 (``factorization="tucker"`` on a conv): ``(U, [V, core], s)``, the core
        ``(r_o, r_i, K…)`` being the one mode with more than two dims (:func:`is_tucker_modes`)."""
        if self.tucker:
            return self.lava_U, [self.lava_V, self.lava_core], self.scale
        return self.lava_U, [self.lava_V, *self.lava_P], self.scale

    def matrix_factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.lava_U, self.lava_V

    def delta_from_factors(self, up: torch.Tensor, modes: list[torch.Tensor], scale: float) -> torch.Tensor:
        """``ΔW`` of factors ``U (O, b)``, ``[V (b, I), P_k (b, K_k)]`` (the LoRA form on matrices, CP on convs),
        or of Tucker-2 factors ``U (O, r_o)``, ``[V (r_i, I), core (r_o, r_i, K…)]``."""
        if is_tucker_modes(modes):
            return tucker.tucker_delta(up, modes[1], modes[0], scale)
        down, spatial_modes = modes[0], modes[1:]
        if self._equation is None:
            return (up @ down) * scale
        # CP sum as one GEMM: (s·U) @ [V ⊙ (P1 ⊗ … ⊗ PN)] -- equal to einsum(self._equation, ...)
        # but ~80x faster on CPU than torch.einsum's left-to-right broadcast contraction.
        b = down.shape[0]
        spatial = spatial_modes[0]
        for p in spatial_modes[1:]:
            spatial = (spatial[:, :, None] * p[:, None, :]).reshape(b, -1)
        vk = (down[:, :, None] * spatial[:, None, :]).reshape(b, -1)
        return ((up * scale) @ vk).view(self.spec.canonical_shape)

    def delta_weight(self) -> torch.Tensor:
        return self.delta_from_factors(*self.effective_factors())

    # -- conv execution path -------------------------------------------------------
    def _dropout_active(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout)

    def conv_path_for(self, x, layer) -> str:
        """``"weight"`` or ``"separable"`` for this input (deterministic in shapes, dtype, device type)."""
        if self.conv_path != "auto":
            return self.conv_path
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if self.tucker:
            return tucker.choose_tucker_path(layer.base_layer, tuple(x.shape), *self.lava_core.shape[:2], dtype,
                                             x.device.type)
        return choose_conv_path(layer.base_layer, tuple(x.shape), self.r, dtype, x.device.type)

    def uses_weight_path(self) -> bool:
        """Without the input at hand: only ``conv_path="weight"`` commits to the weight path."""
        return self.spec.kind == "conv" and self.conv_path == "weight" and not self._dropout_active()

    def uses_weight_path_for(self, x, layer) -> bool:
        """With the input: ``"auto"`` asks the cost model (dropout forces the separable chain)."""
        if self.spec.kind != "conv" or self._dropout_active():
            return False
        return self.conv_path_for(x, layer) == "weight"

    def linear_factors(self):
        return lowrank_factors(self)

    def forward(self, x, base_out, layer):
        if self.spec.kind == "conv":
            if self.conv_path == "weight" and not self._dropout_active():
                return super().forward(x, base_out, layer)  # weight path asked for but run separately
            x_in = self.dropout(x) if self._dropout_active() else x
            return conv_chain(x_in, *self.effective_factors(), layer, base_out.dtype, base_out)
        up, modes, scale = self.effective_factors()
        return lowrank_forward(x, modes[0], up, scale, self, base_out.dtype, base_out)

    def orthogonality_terms(self, up: torch.Tensor, modes: list[torch.Tensor]) -> list[torch.Tensor]:
        """The factors among ``up``, ``modes = [V, P_1, …]`` that ``orth_factors`` names, each as ``(d, r)``."""
        if self.orth_factors == "out":
            return [up]
        if self.orth_factors == "in":
            return [modes[0].T]
        return [up, *(m.T for m in modes if m.dim() == 2)]  # a Tucker core is not regularized

    def regularized_factors(self) -> list[torch.Tensor]:
        """The factors the orthogonality term acts on, each as ``(d, r)`` (columns = components): the
        stored ones (a variant whose factors differ in value overrides this)."""
        return self.orthogonality_terms(self.lava_U, [self.lava_V, *self.lava_P])

    def regularization(self) -> torch.Tensor:
        return sum(orth_penalty(f) for f in self.regularized_factors())

    batched_regularization = staticmethod(batched_orth_penalty)

    def batchable_regularization_factors(self) -> list[torch.Tensor] | None:
        """The factors whose orth penalties sum to :meth:`regularization` (for the batched
        model-level term), or ``None`` when a subclass computes something else."""
        if type(self).regularization is not LavaAdapter.regularization:
            return None
        return self.regularized_factors()


def conv_chain(x, up: torch.Tensor, modes: list[torch.Tensor], scale: float, layer, dtype: torch.dtype,
               base_out: torch.Tensor | None = None) -> torch.Tensor:
    """``[base_out +] conv(x, ΔW)`` of conv factors without building ``ΔW``: the CP separable chain, or
    the Tucker-2 three-conv chain when ``modes = [V, core]``."""
    if is_tucker_modes(modes):
        return tucker.tucker_conv_chain(x, up, modes[1], modes[0], scale, layer.base_layer, dtype, base_out)
    return cp_conv_separable(x, up, modes[0], list(modes[1:]), scale, layer.base_layer, dtype, base_out)


class DoraLavaAdapter(WeightDecomposed, LavaAdapter):
    """LAVA with DoRA's magnitude (``use_dora=True``); on a conv the direction is ``W0 + CP sum`` and the
    increment runs through the separable chain (``ΔW`` never built).  Maths: :mod:`lava_peft.methods.dora`."""

    def __init__(self, spec: LayerSpec, config: LavaConfig, module_name: str):
        super().__init__(spec, config, module_name)
        self.init_dora()

    def conv_increment(self, x, layer, dtype):
        return conv_chain(x, *self.effective_factors(), layer, dtype)


class LavaCodec(FactorCodec):
    """LAVA's factor view: ``U``, ``V`` (and the CP modes ``P_k`` on convs)."""

    svd_singular_values = "down"

    def write(self, adapter, factors: Factors) -> None:
        adapter.lava_U.copy_(factors.up / adapter.scale)
        adapter.lava_V.copy_(factors.modes[0])
        if getattr(adapter, "tucker", False):
            if factors.up.shape != adapter.lava_U.shape or factors.modes[0].shape != adapter.lava_V.shape:
                factors = factors.padded(adapter.r)
                adapter.lava_U.copy_(factors.up / adapter.scale)
                adapter.lava_V.copy_(factors.modes[0])
            adapter.lava_core.copy_(factors.core)
            return
        if adapter.spec.kind == "conv":
            for p, m in zip(adapter.lava_P, factors.modes[1:]):
                p.copy_(m)

    def native_cp(self, spec: LayerSpec) -> bool:
        return spec.kind == "conv"

    def max_rank(self, spec: LayerSpec) -> int:
        return LavaAdapter.max_rank_for(spec)

    def for_config(self, config) -> FactorCodec:
        return LAVA_TUCKER_CODEC if getattr(config, "factorization", "cp") == "tucker" else self

    def for_adapter(self, adapter) -> FactorCodec:
        return LAVA_TUCKER_CODEC if getattr(adapter, "tucker", False) else self


class LavaTuckerCodec(LavaCodec):
    """LAVA with ``factorization="tucker"``: conv factors in Tucker-2 form (``Factors.core``).

    ``"linear"`` combination concatenates the components (block-diagonal core) and re-factors
    the modes whose rank would exceed their dimension by QR: exact at any total rank.  CP
    inputs join with a superdiagonal core.  ``"svd"`` refits by truncated HOSVD."""

    def native_cp(self, spec: LayerSpec) -> bool:
        return False

    def max_rank(self, spec: LayerSpec) -> int:
        return tucker.tucker_max_rank(spec) if spec.kind == "conv" else LavaAdapter.max_rank_for(spec)

    def to_native(self, factors: Factors, spec: LayerSpec) -> Factors | None:
        if spec.kind != "conv":
            return factors.flattened()
        if factors.is_tucker:
            return factors
        if factors.is_cp:
            up, core, V = tucker.tucker_from_cp(factors.up, factors.modes)
            return Factors(up, [V], core)
        return None

    def exact_form(self, factors: Factors, spec: LayerSpec) -> Factors:
        if not factors.is_tucker:
            return factors
        up, core, V = tucker.tucker_compress(factors.up, factors.core, factors.modes[0])
        return Factors(up, [V], core)

    def refit(self, target: torch.Tensor, rank: int, spec: LayerSpec) -> Factors | None:
        if spec.kind != "conv":
            return None
        up, core, V = tucker.tucker_hosvd(target, *tucker.tucker_mode_ranks(spec, rank))
        return Factors(up, [V], core)


LAVA_TUCKER_CODEC = LavaTuckerCodec()
register_method("lava", LavaConfig, LavaAdapter)
register_factor_codec("lava", LavaCodec())
