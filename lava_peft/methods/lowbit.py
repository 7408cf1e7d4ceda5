"""Low-bit adapters: LoRA or LAVA whose factors are trained quantization-aware and stored bit-packed.

Bi-LoRA of Jie et al. (ICCV 2023) generalised to both factorizations.  With ``Q_k`` the
k-bit fake quantizer of :mod:`lava_peft.lowbit` (standardize, Gaussian codebook,
de-standardize, straight-through gradient), the increment is the LoRA / LAVA one on the
quantized factors::

    LoRA:       ΔW = s · Q_k(B) Q_k(A)
    LAVA conv:  ΔW[o,i,k1..kN] = s · Σ_j Q_k(U)[o,j] Q_k(V)[j,i] Q_k(P1)[j,k1] ··· Q_k(PN)[j,kN]

``quantize`` picks the factors: ``"all"``, ``"up"`` (``B`` / ``U``) or ``"down"`` (``A`` /
``V``); LAVA's spatial factors ``P`` are quantized with ``"all"`` only.  The adapters
subclass :class:`~.lora.LoraAdapter` / :class:`~.lava.LavaAdapter` and implement one hook,
:meth:`~LowBitAdapter.effective_factors`: the parameters (``lora_A`` …) hold the fp32
*latent* ``w`` and the hook gives ``Q_k(w)``.  So every inherited path — the fused
Linear node (``linear_factors()``), the separable CP conv, ``delta_weight()``, merging,
the orthogonality term (on the quantized factors) — runs on the quantized factors.

**Init.**  ``init="zero_delta"`` (default) keeps the underlying method's init: the zero
factor (LoRA ``B``, LAVA ``V``) has ``σ = 0``, which the quantizer maps to exactly ``μ = 0``
(not a division by zero), so ``ΔW = 0`` exactly and the model starts as the base model.
Its first gradient is the identity STE, exactly LoRA's; after one step the factor has a
spread and is quantized normally.  ``init="paper"`` follows the reference code, which
cannot represent a zero matrix (it standardizes with ``σ + 1e-5``): every quantized factor
that the underlying init leaves at zero is drawn from a normal with std 1e-3 truncated
to ±2e-3.  Then **ΔW ≠ 0 at init** (of order ``s·0.67e-3·σ(A)`` per weight for 1 bit).

**Files.**  ``save_pretrained`` writes, per quantized factor ``<f>`` (e.g. ``lora_A``,
``lava_P.0``), ``<f>.codes`` (uint8, ``ceil(n·k/8)`` bytes, bit-packed), ``<f>.stats``
(fp32 ``[μ, σ]``) and ``<f>.shape`` (int64) — not the fp32 latent; unquantized factors
are stored as usual.  ``keep_latent=True`` also stores the latent ``<f>`` (fp32), so
that training can be resumed.  A factor loaded from codes alone is *frozen to its codes*:
its value is ``dequantize(codes, μ, σ)``, exactly the fake-quantized value it was saved
with, for inference, merging and re-saving (bit-identical).  It cannot be trained
further (the latent is not in the file): a training forward raises.  The parameter then
holds a copy of the dequantized value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import LavaConfigError, LavaError
from .base import LayerSpec
from ..lowbit import check_codebook, fake_quantize
from .factorized import FactorizedAdapter, FactorizedConfig, register_factorized
from .lava import LavaAdapter
from .lora import LoraAdapter
from .packed_codes import BitPackedTensors


@dataclass
class LowBitConfig(FactorizedConfig):
    """Low-bit LoRA / LAVA.

    Args:
        bits: bits per stored factor weight (1..8).
        factorization: ``"lora"`` or ``"lava"`` (LAVA: CP on conv kernels).
        quantize: which factors are quantized: ``"all"``, ``"up"`` (``B``/``U``) or
            ``"down"`` (``A``/``V``); LAVA spatial factors only with ``"all"``.
        init: ``"zero_delta"`` (ΔW = 0 at init, default) or ``"paper"`` (quantized zero
            factors start as a ±2e-3-truncated normal with std 1e-3: ΔW ≠ 0 at init).
        codebook: ``"exact"`` (the converged Gaussian-median codebook) or ``"reference"`` (the reference
            code's 500-step fixed-point values, :func:`lava_peft.lowbit.reference_codebook`; equal up to
            4 bits, different from 5 bits on).
        keep_latent: also save the fp32 latent factors (needed to resume training).
        factor_init: the underlying method's ``init`` (LoRA: ``"default"``/``"gaussian"``;
            LAVA: ``"orthogonal"``/``"lora"``); ``None`` = its default.
        orth_lambda, orth_factors, spatial_init, conv_path: LAVA's options (factorization
            ``"lava"`` only).  ``orth_lambda`` defaults to 0 here: the quantized ``U`` is not
            orthonormal at init, so the term would not start at 0.  When set, it acts on the
            quantized factors (gradient by the straight-through estimator).  With
            ``factorization="lora"`` only ``orth_lambda`` is checked (the others are ignored).
    """

    cli_help: ClassVar[str | None] = "low-bit LoRA: fake-quantized factors, bit-packed in the file"
    cli_options: ClassVar[dict[str, tuple]] = {"bits": (1, int, "lowbit: bits per adapter weight (1..8)")}

    @classmethod
    def from_cli(cls, opts, common):
        return cls(bits=opts["bits"], **common)

    factor_init_field = "factor_init"
    lava_only = ("orth_lambda",)

    bits: int = 1
    codebook: str = "exact"
    quantize: str = "all"
    init: str = "zero_delta"
    keep_latent: bool = False
    factor_init: str | None = None
    orth_lambda: float = 0.0
    spatial_init: str = "gaussian"
    conv_path: str = "auto"

    def validate_fields(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise LavaConfigError(
                f"LowBitConfig.bits must be an integer from 1 to 8 (bits per stored weight); got {self.bits!r}"
            )
        check_codebook(self.codebook)
        if self.quantize not in ("all", "up", "down"):
            raise LavaConfigError(f"LowBitConfig.quantize must be 'all', 'up' or 'down'; got {self.quantize!r}")
        if self.init not in ("zero_delta", "paper"):
            raise LavaConfigError(f"LowBitConfig.init must be 'zero_delta' or 'paper'; got {self.init!r}")
        if not isinstance(self.keep_latent, bool):
            raise LavaConfigError(f"LowBitConfig.keep_latent must be True or False; got {self.keep_latent!r}")

    factor_config = FactorizedConfig.plain_config  # the LoRA / LAVA config of the underlying (unquantized) method


class LowBitAdapter(BitPackedTensors, FactorizedAdapter):
    """Registered adapter class; constructs a :class:`LowBitLoraAdapter` or :class:`LowBitLavaAdapter`."""

    def __init__(self, spec: LayerSpec, config: LowBitConfig, module_name: str):
        super().__init__(spec, config.factor_config(), module_name)
        self.bits = config.bits
        self.codebook = config.codebook
        self.keep_latent = config.keep_latent
        keys = {"up": (self._UP,), "down": (self._DOWN,)}.get(config.quantize, self.factor_keys())
        self.quantized_keys: tuple[str, ...] = keys
        if config.init == "paper":
            with torch.no_grad():
                for key in self.quantized_keys:
                    latent = self.latent_factor(key)
                    if not torch.count_nonzero(latent):
                        nn.init.trunc_normal_(latent, std=1e-3, a=-2e-3, b=2e-3)

    # -- factors ------------------------------------------------------------------
    latent_factor = FactorizedAdapter.factor  # the fp32 parameter (the latent) behind factor ``key``

    def _packed_latent(self, key: str) -> torch.Tensor:
        return self.latent_factor(key)

    def effective_factors(self) -> tuple[torch.Tensor, list[torch.Tensor], float]:
        """``(Q(up), [Q(down), Q(P_1), …], s)``: the quantized factors fake-quantized (the dequantized
        codes when frozen), the others as stored.  Every inherited LoRA / LAVA path runs on these."""
        up, *modes = (self._effective(key, self.latent_factor(key)) for key in self.factor_keys())
        return up, modes, self.scale

    def _effective(self, key: str, param: torch.Tensor) -> torch.Tensor:
        """``Q_k(latent)`` for a quantized factor (the dequantized codes when frozen); else the parameter."""
        if key not in self.quantized_keys:
            return param
        if not self.is_frozen(key):
            return fake_quantize(param, self.bits, codebook=self.codebook)
        if self.training and torch.is_grad_enabled() and param.requires_grad:
            raise LavaError(
                f"this low-bit adapter was loaded from bit-packed codes without its fp32 latent factors "
                f"({key}): it is for inference and merging only. To continue training, save it with "
                "LowBitConfig(keep_latent=True), or call model.eval() / torch.no_grad() for inference"
            )
        return self._frozen_value(key)


class LowBitLoraAdapter(LowBitAdapter, LoraAdapter):
    """LoRA with quantized factors: ``ΔW = s·Q(B)·Q(A)`` (``A`` = down, ``B`` = up)."""


class LowBitLavaAdapter(LowBitAdapter, LavaAdapter):
    """LAVA with quantized factors (CP on conv kernels; ``U`` = up, ``V`` = down, ``P`` spatial)."""

    def regularized_factors(self) -> list[torch.Tensor]:
        """The orthogonality term acts on the quantized factors (gradient by the straight-through estimator)."""
        up, modes, _ = self.effective_factors()
        return self.orthogonality_terms(up, modes)


register_factorized("lowbit", LowBitConfig, LowBitAdapter, lora=LowBitLoraAdapter, lava=LowBitLavaAdapter)
