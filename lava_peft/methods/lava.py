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

import torch
from torch import nn

from ..config import AdapterConfig, register_method
from ..errors import LavaConfigError
from ..layers import LayerSpec
from .base import DeltaAdapter, lowrank_forward


@dataclass
class LavaConfig(AdapterConfig):
    """LAVA config. ``orth_lambda`` weighs the orthogonality term (0 disables it)."""

    orth_lambda: float = 0.1
    orth_factors: str | None = None
    init: str = "orthogonal"
    spatial_init: str = "gaussian"

    def __post_init__(self) -> None:
        if self.orth_factors is None:
            self.orth_factors = "in" if self.init == "lora" else "out"
        super().__post_init__()

    def regularization_weight(self) -> float:
        return self.orth_lambda

    def validate(self) -> None:
        super().validate()
        if self.orth_lambda < 0:
            raise LavaConfigError(f"orth_lambda must be >= 0; got {self.orth_lambda}")
        if self.orth_factors not in ("out", "in", "all"):
            raise LavaConfigError(f"orth_factors must be 'out', 'in' or 'all'; got {self.orth_factors!r}")
        if self.init not in ("orthogonal", "lora"):
            raise LavaConfigError(f"LavaConfig.init must be 'orthogonal' or 'lora'; got {self.init!r}")
        if self.spatial_init not in ("gaussian", "uniform"):
            raise LavaConfigError(f"spatial_init must be 'gaussian' or 'uniform'; got {self.spatial_init!r}")


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


def cp_einsum_equation(n_spatial: int) -> str:
    """E.g. 2 spatial modes: ``'oj,ji,ja,jb->oiab'``."""
    letters = [c for c in string.ascii_lowercase if c not in "oij"][:n_spatial]
    factors = ",".join(["oj", "ji"] + [f"j{c}" for c in letters])
    return f"{factors}->oi{''.join(letters)}"


class LavaAdapter(DeltaAdapter):
    def __init__(self, spec: LayerSpec, config: LavaConfig, module_name: str):
        super().__init__(spec, config, module_name)
        r, O, I = self.r, spec.out_dim, spec.in_dim
        self.orth_factors = config.orth_factors
        if config.init == "orthogonal":
            self.lava_U = nn.Parameter(orthonormal_factor(O, r))
            self.lava_V = nn.Parameter(torch.zeros(r, I))
        else:
            self.lava_U = nn.Parameter(torch.zeros(O, r))
            self.lava_V = nn.Parameter(torch.empty(r, I))
            nn.init.kaiming_uniform_(self.lava_V, a=math.sqrt(5))
        self.lava_P = nn.ParameterList()
        for k in spec.kernel_size:
            if config.spatial_init == "uniform":
                p = torch.full((r, k), 1.0 / math.sqrt(k))
            else:
                p = torch.randn(r, k) / math.sqrt(k)
            self.lava_P.append(nn.Parameter(p))
        self._equation = cp_einsum_equation(len(spec.kernel_size)) if spec.kind == "conv" else None

    @staticmethod
    def max_rank_for(spec: LayerSpec) -> int:
        """Linear: min(O, I). Conv: the generic CP-rank bound ``Π dims / max dim``."""
        if spec.kind != "conv":
            return min(spec.out_dim, spec.in_dim)
        dims = spec.canonical_shape
        return math.prod(dims) // max(dims)

    @classmethod
    def check_layer(cls, spec: LayerSpec, config, module_name: str) -> None:
        r = config.rank_for(module_name)
        limit = cls.max_rank_for(spec)
        if r > limit:
            raise LavaConfigError(
                f"LAVA rank r={r} is larger than allowed ({limit}) for {module_name} with weight "
                f"{spec.canonical_shape}; lower r or set rank_pattern={{'{module_name}': {limit}}}"
            )

    def delta_weight(self) -> torch.Tensor:
        if self._equation is None:
            return (self.lava_U @ self.lava_V) * self.scale
        return torch.einsum(self._equation, self.lava_U, self.lava_V, *self.lava_P) * self.scale

    def forward(self, x, base_out, layer):
        if self.spec.kind == "conv":
            return super().forward(x, base_out, layer)
        return base_out + lowrank_forward(x, self.lava_V, self.lava_U, self.scale, self, base_out.dtype)

    def regularized_factors(self) -> list[torch.Tensor]:
        """The factors the orthogonality term acts on, each as ``(d, r)`` (columns = components)."""
        if self.orth_factors == "out":
            return [self.lava_U]
        if self.orth_factors == "in":
            return [self.lava_V.T]
        return [self.lava_U, self.lava_V.T, *(p.T for p in self.lava_P)]

    def regularization(self) -> torch.Tensor:
        return sum(orth_penalty(f) for f in self.regularized_factors())


register_method("lava", LavaConfig, LavaAdapter)
