"""Bit-packed storage of quantization-aware tensors, shared by low-bit LoRA/LAVA and 1-bit module adapters.

A tensor ``w`` named in ``quantized_keys`` is used as ``Q_k(w)`` (:func:`lava_peft.lowbit.fake_quantize`)
while its parameter holds the fp32 latent.  In the state dict (= the adapter file) ``w`` is replaced by

* ``w.codes``: uint8, ``ceil(n·k/8)`` bytes (:func:`~lava_peft.lowbit.pack_codes`),
* ``w.stats``: fp32 ``[μ, σ]``,
* ``w.shape``: int64,

plus the latent ``w`` itself with ``keep_latent``.  Loading codes without a latent *freezes* ``w``: the
parameter gets ``dequantize(codes, μ, σ)`` — exactly the value it was saved with — the codes stay as
non-persistent buffers ``<slot>_q{codes,stats,shape}`` so that re-saving is bit-identical, and a training
forward is refused (the latent is gone).

:class:`BitPackedTensors` is a mixin (put it before the ``nn.Module`` base); a class sets ``bits``,
``codebook``, ``keep_latent``, ``quantized_keys`` and may override :meth:`_packed_latent` (where the
latent of ``key`` lives) and :meth:`_packed_slot` (the buffer-name prefix of ``key``).
"""

from __future__ import annotations

import torch

from ..errors import AdapterFileError
from ..lowbit import dequantize, pack_codes, packed_size, quantize, unpack_codes

PACKED_SUFFIXES = ("codes", "stats", "shape")

__all__ = ["BitPackedTensors", "PACKED_SUFFIXES"]


class BitPackedTensors:
    """Mixin: files hold bit-packed codes for ``quantized_keys``; codes alone freeze the tensor."""

    bits: int | None = None
    codebook: str = "exact"
    keep_latent: bool = False
    quantized_keys: tuple[str, ...] = ()

    # -- hooks ------------------------------------------------------------------------
    def _packed_latent(self, key: str) -> torch.Tensor:
        """The fp32 parameter (the latent) behind ``key``."""
        return self._parameters[key]

    @staticmethod
    def _packed_slot(key: str) -> str:
        """Buffer-name prefix of ``key`` (buffer names cannot hold dots)."""
        return key.replace(".", "_")

    # -- state ------------------------------------------------------------------------
    def is_frozen(self, key: str) -> bool:
        """Whether ``key`` was loaded from codes alone (its value is fixed to them)."""
        return f"{self._packed_slot(key)}_qcodes" in self._buffers

    def _frozen_value(self, key: str) -> torch.Tensor:
        """``dequantize(codes, μ, σ)`` of a frozen ``key``, from its stored buffers."""
        slot, latent = self._packed_slot(key), self._packed_latent(key)
        codes = unpack_codes(self._buffers[f"{slot}_qcodes"], self.bits, latent.numel()).view(latent.shape)
        stats = self._buffers[f"{slot}_qstats"]
        return dequantize(codes, stats[0], stats[1], self.bits, self.codebook)

    def _packed_state(self, key: str) -> dict[str, torch.Tensor]:
        """``{codes, stats, shape}`` of ``key``: the stored ones when frozen, else quantized from the latent now."""
        if self.is_frozen(key):
            slot = self._packed_slot(key)
            return {s: self._buffers[f"{slot}_q{s}"] for s in PACKED_SUFFIXES}
        latent = self._packed_latent(key).detach()
        codes, stats = quantize(latent, self.bits, self.codebook)
        shape = torch.tensor(list(latent.shape), dtype=torch.int64, device=latent.device)
        return {"codes": pack_codes(codes, self.bits), "stats": stats, "shape": shape}

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The file content: packed codes + ``[μ, σ]`` + shape per quantized tensor (plus the latent
        with ``keep_latent``, unless the tensor is frozen: then there is no latent to keep)."""
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in self.quantized_keys:
            latent = out.pop(prefix + key)
            if self.keep_latent and not self.is_frozen(key):
                out[prefix + key] = latent
            for suffix, tensor in self._packed_state(key).items():
                out[f"{prefix}{key}.{suffix}"] = tensor
        return out

    def _decode(self, where: str, key: str, codes, stats, shape) -> torch.Tensor:
        """Check the stored tensors of ``key`` (dtype, size, finite ``[μ, σ ≥ 0]``) and dequantize them."""
        latent = self._packed_latent(key)
        expected = packed_size(latent.numel(), self.bits)
        problems = []
        if codes.dtype != torch.uint8 or tuple(codes.shape) != (expected,):
            problems.append(f"codes must be uint8 of shape ({expected},), got {codes.dtype} {tuple(codes.shape)}")
        if stats.dtype != torch.float32 or tuple(stats.shape) != (2,):
            problems.append(f"stats must be float32 [mu, sigma], got {stats.dtype} {tuple(stats.shape)}")
        elif not (torch.isfinite(stats).all() and stats[1] >= 0):
            problems.append(f"stats [mu, sigma] = {stats.tolist()} are not finite with sigma >= 0")
        if shape.dtype != torch.int64 or shape.tolist() != list(latent.shape):
            problems.append(f"shape must be int64 {list(latent.shape)}, got {shape.dtype} {shape.tolist()}")
        if problems:
            raise AdapterFileError(f"{where}{key}: " + "; ".join(problems) + "; the file is corrupt or was edited")
        values = unpack_codes(codes.to(latent.device), self.bits, latent.numel()).view(latent.shape)
        stats = stats.to(latent.device)
        return dequantize(values, stats[0], stats[1], self.bits, self.codebook)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Codes without a latent → the parameter gets the dequantized value and ``key`` is frozen to
        its codes; a latent in the state dict → trained from the latent (the codes are redundant)."""
        freeze = {}
        for key in self.quantized_keys:
            names = [f"{prefix}{key}.{s}" for s in PACKED_SUFFIXES]
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
                device = self._packed_latent(key).device
                freeze[key] = (codes.to(device).clone(), stats.to(device).clone(), shape.to(device).clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key, packed in freeze.items():
            slot = self._packed_slot(key)
            for suffix, tensor in zip(PACKED_SUFFIXES, packed or (None,) * 3):
                name = f"{slot}_q{suffix}"
                if tensor is None:
                    self._buffers.pop(name, None)
                    self._non_persistent_buffers_set.discard(name)
                else:
                    self.register_buffer(name, tensor, persistent=False)

    def _apply(self, fn, recurse=True):
        """``model.half()`` / ``.to(bf16)`` must not round the stored ``[μ, σ]``: they keep fp32 (moved only)."""
        stats = {n: b for n, b in self._buffers.items() if n.endswith("_qstats")}
        super()._apply(fn, recurse)
        for name, old in stats.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self
