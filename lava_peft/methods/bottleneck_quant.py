"""Quantization-aware weights of module adapters, stored bit-packed (1-bit bottleneck adapters, Bi-Head).

A weight ``w`` named in ``quantized_keys`` is used as ``Q_k(w)`` (:func:`lava_peft.lowbit.fake_quantize`:
standardize, Gaussian codebook, de-standardize; straight-through gradient).  The parameter holds the fp32
latent.  In the state dict (= the file) ``w`` is replaced by ``w.codes`` (uint8, ``ceil(n·k/8)`` bytes,
:func:`~lava_peft.lowbit.pack_codes`), ``w.stats`` (fp32 ``[μ, σ]``) and ``w.shape`` (int64); with
``keep_latent`` the latent ``w`` is stored too.  Loading codes without a latent *freezes* ``w`` to its
codes: the parameter gets ``dequantize(codes, μ, σ)`` — exactly the value it was saved with — and is used
as is (re-quantizing a dequantized tensor would move it: its ``μ, σ`` differ), re-saved from the stored
codes (bit-identical), and refuses a training forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LavaError
from ..lowbit import fake_quantize
from .packed_codes import BitPackedTensors


class QuantizedTensors(BitPackedTensors, nn.Module):
    """Mixin for module adapters: call :meth:`setup_quantization` after creating the parameters.

    Storage (codes, stats, shape; freezing to codes) is :class:`~.packed_codes.BitPackedTensors`'."""

    def setup_quantization(self, keys: tuple[str, ...], bits: int | None, codebook: str, keep_latent: bool) -> None:
        self.quantized_keys = tuple(keys) if bits else ()
        self.bits, self.codebook, self.keep_latent = (bits if keys else None), codebook, keep_latent

    def effective(self, key: str) -> torch.Tensor:
        """Weight ``key`` as used: ``Q_k(latent)``, its stored value when frozen, else the parameter."""
        param = self._parameters[key]
        if key not in self.quantized_keys:
            return param
        if not self.is_frozen(key):
            return fake_quantize(param, self.bits, codebook=self.codebook)
        if self.training and torch.is_grad_enabled() and param.requires_grad:
            raise LavaError(
                f"this 1-bit/low-bit adapter was loaded from bit-packed codes without its fp32 latent ({key}): it is "
                "for inference only. Save it with keep_latent=True to train it further, or call model.eval()")
        return param
