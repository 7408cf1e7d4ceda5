"""LoRA (Hu et al., 2021): ``ΔW = s · B A`` with ``A ∈ R^{r×I}``, ``B ∈ R^{O×r}``, ``s = α/r``.

On a convolution the kernel is flattened, as in HF PEFT: ``A`` is a kernel-sized conv
``I/groups·K1·…·KN → r`` and ``B`` a 1×1 conv ``r → O``; here ``ΔW = s·(B A)`` is
materialised with shape ``(O, I/groups, *K)`` and run as one conv (exact, handles
groups/stride/dilation/padding).  Trainable parameters per conv: ``r·(I/groups·ΠK + O)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import AdapterConfig, register_method
from ..errors import LavaConfigError
from .base import LayerSpec
from .factors import FactorCodec, Factors, register_factor_codec
from .base import DeltaAdapter, lowrank_factors, lowrank_forward
from .dora import WeightDecomposed


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA. ``init="default"``: ``A`` Kaiming-uniform, ``B = 0`` (Embedding: ``A = 0``, ``B`` Gaussian)."""

    cli_help: ClassVar[str | None] = "LoRA (flattened kernels on convs)"

    init: str = "default"
    use_dora: bool = False  # DoRA (weight-decomposed): lava_peft/methods/dora.py

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.use_dora, bool):
            raise LavaConfigError(f"use_dora must be True or False; got {self.use_dora!r}")
        if self.init not in ("default", "gaussian"):
            raise LavaConfigError(f"LoraConfig.init must be 'default' or 'gaussian'; got {self.init!r}")


class LoraAdapter(DeltaAdapter):
    def __init__(self, spec: LayerSpec, config: LoraConfig, module_name: str):
        super().__init__(spec, config, module_name)
        fan_in = spec.in_dim * math.prod(spec.kernel_size)
        self.lora_A = nn.Parameter(torch.empty(self.r, fan_in))
        self.lora_B = nn.Parameter(torch.zeros(spec.out_dim, self.r))
        if spec.kind == "embedding":
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
        elif config.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def for_layer(cls, spec: LayerSpec, config, module_name: str) -> "LoraAdapter":
        if getattr(config, "use_dora", False) and cls is LoraAdapter:
            return DoraLoraAdapter(spec, config, module_name)
        return cls(spec, config, module_name)

    @classmethod
    def check_layer(cls, spec: LayerSpec, config, module_name: str) -> None:
        r = config.rank_for(module_name)
        limit = min(spec.out_dim, spec.in_dim * math.prod(spec.kernel_size))
        if r > limit:
            raise LavaConfigError(
                f"LoRA rank r={r} is larger than allowed ({limit}) for {module_name} with weight "
                f"{spec.canonical_shape}; lower r or set rank_pattern={{'{module_name}': {limit}}}"
            )

    def effective_factors(self) -> tuple[torch.Tensor, list[torch.Tensor], float]:
        """``(B, [A], s)``: the stored factors (variants override this, see :class:`DeltaAdapter`)."""
        return self.lora_B, [self.lora_A], self.scale

    def delta_from_factors(self, up: torch.Tensor, modes: list[torch.Tensor], scale: float) -> torch.Tensor:
        """``ΔW = s·up·down`` in the canonical layout (the flattened kernel reshaped on convs)."""
        return (up @ modes[0]).view(self.spec.canonical_shape) * scale

    def delta_weight(self) -> torch.Tensor:
        return self.delta_from_factors(*self.effective_factors())

    def linear_factors(self):
        return lowrank_factors(self)

    def forward(self, x, base_out, layer):
        if self.spec.kind == "conv":
            return super().forward(x, base_out, layer)
        up, modes, scale = self.effective_factors()
        return lowrank_forward(x, modes[0], up, scale, self, base_out.dtype, base_out)


class DoraLoraAdapter(WeightDecomposed, LoraAdapter):
    """LoRA with DoRA's magnitude (``use_dora=True``); the maths is in :mod:`lava_peft.methods.dora`."""

    def __init__(self, spec: LayerSpec, config: LoraConfig, module_name: str):
        super().__init__(spec, config, module_name)
        self.init_dora()


class LoraCodec(FactorCodec):
    """LoRA's factor view: ``ΔW = s·B·A`` (flattened kernel on convs)."""

    svd_singular_values = "up"

    def write(self, adapter, factors: Factors) -> None:
        adapter.lora_B.copy_(factors.up / adapter.scale)
        adapter.lora_A.copy_(factors.modes[0])

    def max_rank(self, spec: LayerSpec) -> int:
        return min(spec.out_dim, spec.in_dim * math.prod(spec.kernel_size))


register_method("lora", LoraConfig, LoraAdapter)
register_factor_codec("lora", LoraCodec())
