"""The factor view of an adapter: ``ΔW`` as a sum of rank-1 (matrix) or CP components.

:class:`Factors` is the common currency of everything that works on low-rank increments
without materialising ``ΔW``: exact linear combination by concatenation, SVD/CP refits,
fused in-place merges (``W += up @ down`` by one ``addmm``), rank padding for hot-swap and
HF PEFT export.  A method exposes its factors by registering a :class:`FactorCodec` next
to its adapter (``methods/lora.py``, ``methods/lava.py``, ``methods/factorized.py``);
sparse methods register a :class:`SparseCodec` (exact combination on the union of
supports).  This module sits at the bottom with the protocol: it imports only the
method registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..config import AdapterConfig, adapter_class, registered_methods
from .base import LayerSpec


def tucker_flat_down(core: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``D[a, (i, k)] = Σ_b C[a, b, k] · V[b, i]``, shape ``(r_o, I·ΠK)`` (row-major like ``ΔW.reshape(O, -1)``)."""
    r_o, r_i = core.shape[:2]
    kp = core[0, 0].numel()
    # (r_o·ΠK, r_i) @ (r_i, I) -> (r_o, ΠK, I) -> (r_o, I, ΠK)
    cv = core.reshape(r_o, r_i, kp).transpose(1, 2).reshape(r_o * kp, r_i) @ V
    return cv.view(r_o, kp, V.shape[1]).transpose(1, 2).reshape(r_o, -1)


def tucker_block_diag(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """``Σ_p core_p ×₁ U_p ×₂ V_pᵀ`` as one Tucker-2: factors concatenated, cores block-diagonal."""
    U = torch.cat([p[0] for p in parts], dim=1)
    V = torch.cat([p[2] for p in parts], dim=0)
    core = parts[0][1].new_zeros(U.shape[1], V.shape[0], *parts[0][1].shape[2:])
    a = b = 0
    for _, c, _ in parts:
        core[a:a + c.shape[0], b:b + c.shape[1]] = c
        a, b = a + c.shape[0], b + c.shape[1]
    return U, core, V


def is_tucker_modes(modes: Sequence[torch.Tensor]) -> bool:
    """True for the Tucker-2 form of :meth:`~.base.DeltaAdapter.effective_factors`, ``[V (r_i, I), core (r_o, r_i, K…)]``
    (the core is the only factor with more than two dims; CP modes are all ``(R, ·)`` matrices)."""
    return len(modes) == 2 and modes[1].dim() > 2


@dataclass
class Factors:
    """``ΔW = Σ_j up[:, j] ⊗ modes[0][j] ⊗ modes[1][j] ⊗ …`` with the scale folded into ``up``.

    One mode: matrix form, ``modes[0]`` is ``(R, I·K1·…·KN)`` (the flattened kernel).
    ``1 + N`` modes on a conv: CP form, ``modes = [V (R, I), P_1 (R, K1), …]``.
    Tucker-2 form on a conv (``core`` set): ``ΔW = core ×₁ up ×₂ Vᵀ`` with ``up (O, r_o)``,
    ``modes = [V (r_i, I)]``, ``core (r_o, r_i, K1, …, KN)``; its rank is ``max(r_o, r_i)``.
    """

    up: torch.Tensor
    modes: list[torch.Tensor]
    core: torch.Tensor | None = None

    @staticmethod
    def from_modes(up: torch.Tensor, modes: Sequence[torch.Tensor]) -> "Factors":
        """The :class:`Factors` of an ``effective_factors()`` view ``(up, modes)`` (Tucker: ``modes = [V, core]``)."""
        if is_tucker_modes(modes):
            return Factors(up, [modes[0]], modes[1])
        return Factors(up, list(modes))

    @property
    def rank(self) -> int:
        if self.core is not None:
            return max(self.up.shape[1], self.modes[0].shape[0])
        return self.up.shape[1]

    @property
    def is_cp(self) -> bool:
        return self.core is None and len(self.modes) > 1

    @property
    def is_tucker(self) -> bool:
        return self.core is not None

    def detached(self) -> "Factors":
        return Factors(self.up.detach(), [m.detach() for m in self.modes],
                       None if self.core is None else self.core.detach())

    def flattened(self) -> "Factors":
        """Matrix form: ``down_j = V_j ⊗ P_{1j} ⊗ … ⊗ P_{Nj}`` (row-major, as ``ΔW.reshape(O, -1)``);
        Tucker-2: ``down[a, (i, k)] = Σ_b core[a, b, k] V[b, i]``."""
        if self.core is not None:
            return Factors(self.up, [tucker_flat_down(self.core, self.modes[0])])
        if not self.is_cp:
            return self
        down = self.modes[0]
        for m in self.modes[1:]:
            down = (down.unsqueeze(-1) * m.unsqueeze(1)).reshape(down.shape[0], -1)
        return Factors(self.up, [down])

    def dense(self, shape: Sequence[int]) -> torch.Tensor:
        flat = self.flattened()
        return (flat.up @ flat.modes[0]).reshape(tuple(shape))

    def scaled(self, c: float) -> "Factors":
        return Factors(self.up * c, list(self.modes), self.core)

    def padded(self, rank: int, fill_modes: bool = False, generator: torch.Generator | None = None) -> "Factors":
        """Append ``rank - R`` zero components (``up`` columns zero, so ``ΔW`` is unchanged).

        ``fill_modes=True`` gives the new components random unit mode vectors (still
        ``ΔW``-neutral because ``up`` is zero) so that they can learn if trained further.
        """
        extra = rank - self.rank
        if extra < 0:
            raise ValueError(f"cannot pad rank {self.rank} down to {rank}")
        if extra == 0:
            return self
        if self.core is not None:  # mode ranks min(rank, O) and min(rank, I); zero-padded core
            (O, r_o), (r_i, I) = self.up.shape, self.modes[0].shape
            ro, ri = min(rank, O), min(rank, I)
            core = self.core.new_zeros(ro, ri, *self.core.shape[2:])
            core[:r_o, :r_i] = self.core
            V = torch.cat([self.modes[0], self.modes[0].new_zeros(ri - r_i, I)], dim=0)
            if fill_modes:
                V[r_i:] = torch.randn(ri - r_i, I, generator=generator, dtype=V.dtype) / math.sqrt(I)
            return Factors(torch.cat([self.up, self.up.new_zeros(O, ro - r_o)], dim=1), [V], core)
        up = torch.cat([self.up, self.up.new_zeros(self.up.shape[0], extra)], dim=1)
        modes = []
        for m in self.modes:
            if fill_modes:
                new = torch.randn(extra, m.shape[1], generator=generator, dtype=m.dtype)
                new = new / new.norm(dim=1, keepdim=True).clamp_min(1e-12)
            else:
                new = m.new_zeros(extra, m.shape[1])
            modes.append(torch.cat([m, new], dim=0))
        return Factors(up, modes)

    @staticmethod
    def cat(parts: Sequence["Factors"]) -> "Factors":
        """Concatenated components: the exact sum of the parts' increments (Tucker parts: block-diagonal
        core; parts of different forms are flattened to the matrix form first)."""
        if all(p.core is not None for p in parts):
            up, core, V = tucker_block_diag([(p.up, p.core, p.modes[0]) for p in parts])
            return Factors(up, [V], core)
        if any(p.core is not None for p in parts) or len({len(p.modes) for p in parts}) != 1:
            parts = [p.flattened() for p in parts]
        up = torch.cat([p.up for p in parts], dim=1)
        modes = [torch.cat([p.modes[k] for p in parts], dim=0) for k in range(len(parts[0].modes))]
        return Factors(up, modes)


class FactorCodec:
    """How a method's adapter exposes its increment as :class:`Factors`.

    Register one per method with :func:`register_factor_codec` to get exact
    ``"linear"`` combination by concatenation, low-rank ``"svd"`` results, fused
    in-place merges, rank-padded hot-swap and HF PEFT export.  A method without a
    codec still gets every combination (as a ``dense_delta`` or LoRA result).
    """

    #: where the SVD puts the singular values: ``"up"`` (``B = U S``, PEFT's choice)
    #: or ``"down"`` (``U`` orthonormal).
    svd_singular_values = "up"

    def read(self, adapter, scaled: bool = True) -> Factors:
        """The factors; ``scaled=True`` folds the adapter's scale into ``up``, ``False`` gives the raw tensors.

        By default the adapter's own factor view, :meth:`~.base.DeltaAdapter.effective_factors`."""
        up, modes, scale = adapter.effective_factors()
        return Factors.from_modes(up * scale if scaled else up, modes)

    def read_with_scale(self, adapter) -> tuple[Factors, float]:
        """``(raw factors, scale)`` from one :meth:`~.base.DeltaAdapter.effective_factors` call: what
        :meth:`read` returns is ``up · scale`` with these (a caller scaling many factors at once uses it)."""
        up, modes, scale = adapter.effective_factors()
        return Factors.from_modes(up, modes), scale

    def write(self, adapter, factors: Factors) -> None:  # pragma: no cover - abstract
        """Copy ``factors`` (native form, rank = adapter's rank) into the adapter in place."""
        raise NotImplementedError

    def native_cp(self, spec: LayerSpec) -> bool:
        """Whether the method stores this layer in CP form (else matrix form)."""
        return False

    def max_rank(self, spec: LayerSpec) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def for_config(self, config: AdapterConfig) -> "FactorCodec":
        """The codec for adapters built from ``config`` (a method whose conv layout is a config
        field, e.g. LAVA's ``factorization``, returns the matching codec)."""
        return self

    def for_adapter(self, adapter) -> "FactorCodec":
        """The codec for this adapter instance (see :meth:`for_config`)."""
        return self

    def to_native(self, factors: Factors, spec: LayerSpec) -> Factors | None:
        """``factors`` in this codec's native form for the layer, or ``None`` if not exactly representable."""
        if self.native_cp(spec) and spec.kernel_size:
            if factors.is_cp and len(factors.modes) == 1 + len(spec.kernel_size):
                return factors
            return None
        return factors.flattened()

    def exact_form(self, factors: Factors, spec: LayerSpec) -> Factors:
        """An exact re-factoring of a concatenation that fits the layer (default: unchanged)."""
        return factors

    def refit(self, target: torch.Tensor, rank: int, spec: LayerSpec) -> Factors | None:
        """A native rank-``rank`` approximation of the dense ``target`` for ``"svd"`` combinations,
        or ``None`` to use the generic one (truncated SVD / CP-ALS)."""
        return None


_CODECS: dict[str, FactorCodec] = {}


def register_factor_codec(method: str, codec: FactorCodec) -> None:
    """Declare how adapters of ``method`` expose factors (see :class:`FactorCodec`)."""
    _CODECS[method] = codec


def factor_codec(method: str) -> FactorCodec | None:
    return _CODECS.get(method)


class SparseCodec:
    """How a sparse method builds a result adapter on a given support (exact ``"linear"`` combination).

    Its adapters expose ``sparse_delta() -> (idx, values)`` with ``ΔW.reshape(-1)[idx] = values``
    (canonical layout, scale folded in); see :class:`~lava_peft.methods.shira.SparseDeltaAdapter`.
    """

    def result_config(self, input_configs: list[AdapterConfig], supports: dict[str, torch.Tensor]) -> AdapterConfig:
        """A config whose adapter on layer ``path`` has exactly the flat indices ``supports[path]``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def write(self, adapter, values: torch.Tensor) -> None:
        """Set the adapter (built from :meth:`result_config`) so that ``sparse_delta()[1] == values``."""
        raise NotImplementedError  # pragma: no cover - abstract


_SPARSE_CODECS: dict[str, SparseCodec] = {}


def register_sparse_codec(method: str, codec: SparseCodec) -> None:
    """Declare that ``"linear"`` combinations of ``method`` adapters stay sparse (union of supports)."""
    _SPARSE_CODECS[method] = codec


def method_of(adapter) -> str | None:
    """The registered method name of an adapter instance.

    The most-derived registered class in the instance's MRO wins: methods such as DyLoRA
    and low-bit register one class that builds a concrete LoRA- or LAVA-based subclass,
    which must map to ``"dylora"`` / ``"lowbit"``, not to ``"lora"``.
    """
    cls = type(adapter)
    method = _METHOD_OF_TYPE.get(cls)
    if method is None:
        registered = {adapter_class(m): m for m in registered_methods()}
        method = next((registered[c] for c in cls.__mro__ if c in registered), None)
        if method is not None:
            _METHOD_OF_TYPE[cls] = method
    return method


_METHOD_OF_TYPE: dict[type, str] = {}


def adapter_factors(adapter) -> Factors | None:
    """The adapter's factors (scale folded in), or ``None`` if its method has no codec."""
    method = method_of(adapter)
    codec = _CODECS.get(method) if method else None
    return codec.read(adapter) if codec is not None else None


def adapter_factors_and_scale(adapter) -> tuple[Factors, float] | None:
    """The adapter's raw factors and scale (``adapter_factors`` folds the scale into ``up``), or ``None``."""
    method = method_of(adapter)
    codec = _CODECS.get(method) if method else None
    return codec.read_with_scale(adapter) if codec is not None else None


def to_native(factors: Factors, codec: FactorCodec, spec: LayerSpec) -> Factors | None:
    """``factors`` in the codec's native form for this layer, or ``None`` if not exactly representable."""
    return codec.to_native(factors, spec)
