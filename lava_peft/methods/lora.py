"""LoRA (Hu et al., 2021): ``ΔW = s · B A`` with ``A ∈ R^{r×I}``, ``B ∈ R^{O×r}``, ``s = α/r``.

On a convolution the kernel is flattened, as in HF PEFT: ``A`` is a kernel-sized conv
``I/groups·K1·…·KN → r`` and ``B`` a 1×1 conv ``r → O``.  Trainable parameters per conv:
``r·(I/groups·ΠK + O)``.  ``conv_path`` says how an unmerged conv runs (all exact):
``"weight"`` — ``ΔW = s·(B A)`` materialised with shape ``(O, I/groups, *K)`` and one conv
with ``W0 + ΔW``; ``"factored"`` — the base conv plus the two convs ``A`` then ``s·B``
(:func:`~lava_peft.methods.cp_conv.lowrank_conv_factored`, grouped convs included);
``"auto"`` (default) — per layer and input shape, the cheaper of the two by LAVA's cost
model (:func:`~lava_peft.methods.cp_conv.choose_conv_path` with ``chain="factored"``).
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
from .base import DeltaAdapter, _dropout_active, lowrank_factors, lowrank_forward
from .cp_conv import choose_conv_path, lowrank_conv_factored
from .dora import WeightDecomposed
from .base_init import InitialisedFromBase, check_base_init, base_init_kind


LORA_CONV_PATHS = ("auto", "weight", "factored")


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA. ``init="default"``: ``A`` Kaiming-uniform, ``B = 0`` (Embedding: ``A = 0``, ``B`` Gaussian);
    ``"gaussian"``: ``A ~ N(0, 1/r²)``; ``"pissa"`` / ``"pissa_niter_<K>"`` / ``"olora"``: factors from the SVD / QR of
    the base weight, which becomes the residual (Linear layers only; :mod:`lava_peft.methods.base_init`)."""

    cli_help: ClassVar[str | None] = "LoRA (flattened kernels on convs)"

    init: str = "default"
    use_dora: bool = False  # DoRA (weight-decomposed): lava_peft/methods/dora.py
    conv_path: str = "auto"  # unmerged conv execution: "auto", "weight" or "factored" (module docstring)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.use_dora, bool):
            raise LavaConfigError(f"use_dora must be True or False; got {self.use_dora!r}")
        check_base_init("LoraConfig", self.init, self.use_dora)
        if self.init not in ("default", "gaussian") and not base_init_kind(self.init):
            raise LavaConfigError(f"LoraConfig.init must be 'default', 'gaussian', 'pissa', 'pissa_niter_<K>' or "
                                  f"'olora'; got {self.init!r}")
        if self.conv_path not in LORA_CONV_PATHS:
            raise LavaConfigError(f"LoraConfig.conv_path must be one of {LORA_CONV_PATHS}; got {self.conv_path!r}")


class LoraAdapter(InitialisedFromBase, DeltaAdapter):
    def __init__(self, spec: LayerSpec, config: LoraConfig, module_name: str):
        super().__init__(spec, config, module_name)
        self.base_init = base_init_kind(getattr(config, "init", None)) and config.init
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
            if self.base_init:  # replaced by init_from_base; draw what PEFT draws (see InitialisedFromBase)
                self.draw_like_peft_up()
        path = getattr(config, "conv_path", None)  # variants' configs (DyLoRA, MoSA, low-bit) may lack it
        self.conv_path = path if path in LORA_CONV_PATHS else "auto"

    @classmethod
    def for_layer(cls, spec: LayerSpec, config, module_name: str) -> "LoraAdapter":
        if getattr(config, "use_dora", False) and cls is LoraAdapter:
            return DoraLoraAdapter(spec, config, module_name)
        return cls(spec, config, module_name)

    @classmethod
    def check_layer(cls, spec: LayerSpec, config, module_name: str) -> None:
        cls.check_base_init_layer(spec, config, module_name)
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

    def matrix_factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.lora_B, self.lora_A

    def delta_from_factors(self, up: torch.Tensor, modes: list[torch.Tensor], scale: float) -> torch.Tensor:
        """``ΔW = s·up·down`` in the canonical layout (the flattened kernel reshaped on convs)."""
        return (up @ modes[0]).view(self.spec.canonical_shape) * scale

    def delta_weight(self) -> torch.Tensor:
        return self.delta_from_factors(*self.effective_factors())

    def linear_factors(self):
        return lowrank_factors(self)

    # -- conv execution path -------------------------------------------------------
    def conv_path_for(self, x, layer) -> str:
        """``"weight"`` or ``"factored"`` for this input (deterministic in shapes, dtype, device type)."""
        if self.conv_path != "auto":
            return self.conv_path
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return choose_conv_path(layer.base_layer, tuple(x.shape), self.r, dtype, x.device.type, chain="factored")

    def uses_weight_path(self) -> bool:
        """Without the input at hand: only ``conv_path="weight"`` commits to the weight path."""
        return super().uses_weight_path() and self.conv_path == "weight"

    def uses_weight_path_for(self, x, layer) -> bool:
        """With the input: ``"auto"`` asks the cost model (active dropout forces the factored convs)."""
        if not super().uses_weight_path():
            return False
        return self.conv_path_for(x, layer) == "weight"

    def forward(self, x, base_out, layer):
        if self.spec.kind == "conv":
            if self.conv_path == "weight" and not _dropout_active(self):
                return super().forward(x, base_out, layer)  # weight path asked for but run separately
            x_in = self.dropout(x) if _dropout_active(self) else x
            up, modes, scale = self.effective_factors()
            return lowrank_conv_factored(x_in, up, modes[0], scale, layer.base_layer, base_out.dtype, base_out)
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
