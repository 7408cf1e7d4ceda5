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

from ..errors import AdapterFileError, LavaError
from ..lowbit import dequantize, fake_quantize, pack_codes, packed_size, quantize, unpack_codes

_SUFFIXES = ("codes", "stats", "shape")


class QuantizedTensors(nn.Module):
    """Mixin for module adapters: call :meth:`setup_quantization` after creating the parameters."""

    bits: int | None = None
    codebook: str = "exact"
    keep_latent: bool = False
    quantized_keys: tuple[str, ...] = ()

    def setup_quantization(self, keys: tuple[str, ...], bits: int | None, codebook: str, keep_latent: bool) -> None:
        self.quantized_keys = tuple(keys) if bits else ()
        self.bits, self.codebook, self.keep_latent = (bits if keys else None), codebook, keep_latent

    def is_frozen(self, key: str) -> bool:
        return f"{key}_qcodes" in self._buffers

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

    def _packed(self, key: str) -> dict[str, torch.Tensor]:
        if self.is_frozen(key):
            return {s: self._buffers[f"{key}_q{s}"] for s in _SUFFIXES}
        latent = self._parameters[key].detach()
        codes, stats = quantize(latent, self.bits, self.codebook)
        shape = torch.tensor(list(latent.shape), dtype=torch.int64, device=latent.device)
        return {"codes": pack_codes(codes, self.bits), "stats": stats, "shape": shape}

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in self.quantized_keys:
            latent = out.pop(prefix + key)
            if self.keep_latent and not self.is_frozen(key):
                out[prefix + key] = latent
            for suffix, tensor in self._packed(key).items():
                out[f"{prefix}{key}.{suffix}"] = tensor
        return out

    def _decode(self, where: str, key: str, codes, stats, shape) -> torch.Tensor:
        param = self._parameters[key]
        expected = packed_size(param.numel(), self.bits)
        problems = []
        if codes.dtype != torch.uint8 or tuple(codes.shape) != (expected,):
            problems.append(f"codes must be uint8 of shape ({expected},), got {codes.dtype} {tuple(codes.shape)}")
        if stats.dtype != torch.float32 or tuple(stats.shape) != (2,):
            problems.append(f"stats must be float32 [mu, sigma], got {stats.dtype} {tuple(stats.shape)}")
        elif not (torch.isfinite(stats).all() and stats[1] >= 0):
            problems.append(f"stats [mu, sigma] = {stats.tolist()} are not finite with sigma >= 0")
        if shape.dtype != torch.int64 or shape.tolist() != list(param.shape):
            problems.append(f"shape must be int64 {list(param.shape)}, got {shape.dtype} {shape.tolist()}")
        if problems:
            raise AdapterFileError(f"{where}{key}: " + "; ".join(problems) + "; the file is corrupt or was edited")
        values = unpack_codes(codes.to(param.device), self.bits, param.numel()).view(param.shape)
        stats = stats.to(param.device)
        return dequantize(values, stats[0], stats[1], self.bits, self.codebook)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        freeze = {}
        for key in self.quantized_keys:
            names = [f"{prefix}{key}.{s}" for s in _SUFFIXES]
            present = [n in state_dict for n in names]
            if not any(present):
                freeze[key] = None
                continue
            if not all(present):
                raise AdapterFileError(f"{prefix}{key}: the state has {[n for n, p in zip(names, present) if p]} but "
                                       f"not {[n for n, p in zip(names, present) if not p]}; the file is corrupt")
            codes, stats, shape = (state_dict.pop(n) for n in names)
            value = self._decode(prefix, key, codes, stats, shape)
            if prefix + key in state_dict:
                freeze[key] = None  # trained from the latent
            else:
                state_dict[prefix + key] = value
                device = self._parameters[key].device
                freeze[key] = (codes.to(device).clone(), stats.to(device).clone(), shape.to(device).clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key, packed in freeze.items():
            for suffix, tensor in zip(_SUFFIXES, packed or (None,) * 3):
                name = f"{key}_q{suffix}"
                if tensor is None:
                    self._buffers.pop(name, None)
                    self._non_persistent_buffers_set.discard(name)
                else:
                    self.register_buffer(name, tensor, persistent=False)

    def _apply(self, fn, recurse=True):
        """Keep the stored ``[μ, σ]`` in fp32 under ``model.half()`` (moved only)."""
        stats = {n: b for n, b in self._buffers.items() if n.endswith("_qstats")}
        super()._apply(fn, recurse)
        for name, old in stats.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self
