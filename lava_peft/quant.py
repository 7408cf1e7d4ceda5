"""Quantized frozen base layers under LAVA / LoRA adapters (QLoRA-style training).

The base ``nn.Linear`` weights are replaced by a quantized layer (bitsandbytes NF4
4-bit, or torchao int8 weight-only); the adapters stay fp32 and run on the factored path
``y = Q(W0)·x + s·U(V x)`` (:func:`lava_peft.methods.base.lowrank_forward`): the base op
is the quantized layer's own forward, the factors are cast to the activation dtype, and
``ΔW`` is never materialised.  Neither backend is a dependency of lava-peft: install
``bitsandbytes`` or ``torchao`` yourself (``pip install bitsandbytes`` / ``pip install
torchao``).

Both quantized layers stay ``nn.Linear`` subclasses / ``nn.Linear`` modules with a tensor
subclass weight, so :func:`lava_peft.adapt` and HF PEFT find them as usual.  Merging an
adapter into a quantized weight is not supported (the increment would have to be
re-quantized); use :func:`is_quantized_linear` to check, and merge into a
full-precision copy of the base instead.

    from lava_peft.quant import quantize_linears
    quantize_linears(model, "bnb-4bit", targets=["q_proj", "v_proj"])   # on the GPU
    model = lp.adapt(model, lp.LavaConfig(r=16, target_modules=["q_proj", "v_proj"]))
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from .errors import LavaError

SCHEMES = ("bnb-4bit", "torchao-int8")


class QuantBackendMissingError(LavaError, ImportError):
    """The quantization backend for the requested scheme is not installed."""


def _matches(name: str, targets) -> bool:
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def available_schemes() -> list[str]:
    """The schemes whose backend imports here."""
    out = []
    for scheme, mod in (("bnb-4bit", "bitsandbytes"), ("torchao-int8", "torchao")):
        try:
            __import__(mod)
            out.append(scheme)
        except Exception:  # noqa: BLE001 - a broken install counts as missing
            pass
    return out


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes 4/8-bit Linear or an ``nn.Linear`` whose weight is a torchao tensor subclass."""
    if type(module).__module__.startswith("bitsandbytes"):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and type(weight).__module__.startswith("torchao")


def _bnb_4bit(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    device = linear.weight.device
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
    q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu", compute_dtype), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to("cpu", compute_dtype), requires_grad=False)
    return q.to(device)  # quantizes on the way to the device


def quantize_linears(model: nn.Module, scheme: str, targets: Iterable[str] | str | None = None,
                     compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Quantize, in place, every ``nn.Linear`` of ``model`` whose name matches ``targets``
    (names / name suffixes, a regex string, or ``None`` for all).  Returns how many.

    ``scheme``: ``"bnb-4bit"`` (bitsandbytes NF4, compute in ``compute_dtype``) or
    ``"torchao-int8"`` (torchao int8 weight-only).  Raises
    :class:`QuantBackendMissingError` naming the package when the backend is missing.
    """
    if scheme not in SCHEMES:
        raise LavaError(f"unknown quantization scheme {scheme!r}; choose one of {SCHEMES}")
    targets = list(targets) if targets is not None and not isinstance(targets, str) else targets
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and n and _matches(n, targets)]
    if not names:
        raise LavaError(f"quantize_linears: no nn.Linear matches targets={targets!r}")
    if scheme == "bnb-4bit":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            raise QuantBackendMissingError(
                f"scheme 'bnb-4bit' needs bitsandbytes ({exc}); install it with `pip install bitsandbytes`"
            ) from None
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _bnb_4bit(getattr(parent, child), compute_dtype))
        return len(names)
    try:
        from torchao.quantization import quantize_
        try:
            from torchao.quantization import Int8WeightOnlyConfig as _cfg

            config = _cfg()
        except ImportError:  # older torchao
            from torchao.quantization import int8_weight_only

            config = int8_weight_only()
    except Exception as exc:  # noqa: BLE001
        raise QuantBackendMissingError(
            f"scheme 'torchao-int8' needs torchao ({exc}); install it with `pip install torchao`"
        ) from None
    wanted = set(names)
    quantize_(model, config, filter_fn=lambda m, fqn: type(m) is nn.Linear and fqn in wanted)
    for name in names:
        model.get_submodule(name).weight.requires_grad_(False)
    return len(names)
