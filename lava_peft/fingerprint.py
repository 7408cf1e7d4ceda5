"""What an adapter file records about its base model, and how a base model is checked against it.

``base_model_fingerprint`` in ``adapter_config.json``::

    {"modules": {path: weight shape}, "sha256": <16 hex digits of json(modules)>,
     "weights": {path: {"sha256": <sha256 of the weight's bytes>, "dtype": "float32"}}}

``modules`` (names and shapes) is always checked on load.  ``weights`` (absent from files
written before it existed) is checked only when asked (``strict_base=True``):
the sha256 of the raw bytes of every targeted base weight as it was before any adapter was
merged into it, so an adapter cannot be applied to a fine-tuned, re-quantized or otherwise
different checkpoint of the same architecture without a word.  Hashing reads every targeted
weight once per save (about 1 GB/s on one core).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .errors import AdapterFileError, IncompatibleBaseModelError, UnsupportedLayerError
from .inject import adapted_layers
from .io import fingerprint
from .layers import AdaptedLayer, layer_ops
from .module_layers import ModuleAdapterHost, module_signature


def weight_digest(weight: torch.Tensor) -> dict | None:
    """``{"sha256": hex, "dtype": name}`` of a weight's raw bytes (row-major), or ``None`` when the
    values are not at hand (a ``meta`` tensor)."""
    tensor = weight.detach()
    full = getattr(tensor, "full_tensor", None)  # an FSDP2 shard: the whole weight (collective)
    if callable(full):
        tensor = full()
    if tensor.is_meta:
        return None
    data = tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return {"sha256": hashlib.sha256(memoryview(data.numpy())).hexdigest(),
            "dtype": str(tensor.dtype).removeprefix("torch.")}


def _unmerged_weight(layer: AdaptedLayer) -> torch.Tensor | None:
    """The layer's base weight without merged adapters, or ``None`` if it cannot be had exactly."""
    if not layer.merged_adapters:
        return layer.base_weight
    return layer._merge_backup  # kept by merge(backup=True) / exact_unmerge; else None


def module_digest(module: nn.Module) -> dict | None:
    """The digest of a module adapter's target (the second kind): sha256 over the sha256 of every base
    weight inside it, in ``named_modules`` order (adapter hosts skipped; an adapted layer counts with
    its unmerged base weight); ``None`` when one of them is not at hand."""
    parts, dtypes, skip = [], set(), []
    for name, sub in module.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(sub, (ModuleAdapterHost, AdaptedLayer)):
            skip.append(name)
        if isinstance(sub, ModuleAdapterHost):
            continue
        tensors = [(name, _unmerged_weight(sub))] if isinstance(sub, AdaptedLayer) else \
            [(f"{name}.{key}", p) for key, p in sub.named_parameters(recurse=False)]
        for key, tensor in tensors:
            digest = None if tensor is None else weight_digest(tensor)
            if digest is None:
                return None
            parts.append(f"{key}:{digest['sha256']}")
            dtypes.add(digest["dtype"])
    return {"sha256": hashlib.sha256("\n".join(parts).encode()).hexdigest(), "dtype": ",".join(sorted(dtypes))}


def _host_digest(layer) -> dict | None:
    if isinstance(layer, ModuleAdapterHost):
        return module_digest(layer.base_layer)
    unmerged = _unmerged_weight(layer)
    return None if unmerged is None else weight_digest(unmerged)


def base_fingerprint(model: nn.Module, adapter_name: str) -> dict:
    """The fingerprint of the base layers that adapter ``adapter_name`` adapts in ``model`` (the base
    model inside an :class:`~lava_peft.AdaptedModel`): shapes (weight adapters: the weight's shape;
    module adapters: ``[type, in, out]``), and the bytes' sha256 of each weight (``None`` for a layer
    merged without a backup: its original bytes are gone; module targets: :func:`module_digest`)."""
    layers = [(path, layer) for path, layer in adapted_layers(model) if adapter_name in layer.adapters]
    shapes = {path: layer.fingerprint_shape() for path, layer in layers}
    weights = {path: getattr(layer.adapters[adapter_name], "original_base_digest", None) or _host_digest(layer)
               for path, layer in layers}  # PiSSA / OLoRA: the weight before it became the residual
    return fingerprint(shapes, weights)


def _shape_problem(path: str, module: nn.Module, shape, module_kind: bool) -> str | None:
    base = module.base_layer if isinstance(module, AdaptedLayer) else module
    if module_kind:
        try:
            here = module_signature(base, path)
        except UnsupportedLayerError as exc:
            return str(exc)
        return None if here == list(shape) else f"{path}: [type, in, out] = {here} here, {list(shape)} in the adapter"
    if layer_ops(base) is None:
        return f"{path}: is a {type(base).__name__}, not an adaptable layer"
    if list(base.weight.shape) != list(shape):
        return f"{path}: weight shape {list(base.weight.shape)} here, {list(shape)} in the adapter"
    return None


def check_base_fingerprint(model: nn.Module, fp, source: str, strict_base: bool = False,
                           module_kind: bool = False) -> list[str]:
    """Refuse a base model that does not fit fingerprint ``fp``; returns the adapted module paths.

    Always: every module exists, is adaptable and has the recorded shape (weight adapters: the
    weight's shape; module adapters, ``module_kind``: ``[type, in, out]`` of
    :func:`~lava_peft.module_layers.module_signature`).  With ``strict_base``: also the sha256 of
    every weight's bytes (see the module docstring).
    """
    modules = fp.get("modules") if isinstance(fp, dict) else None
    if not isinstance(modules, dict) or not modules:
        raise AdapterFileError(f"{source} has no base_model_fingerprint.modules; the file is corrupt")
    problems, bases = [], {}
    for path, shape in modules.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            problems.append(f"{path}: no such module in this base model")
            continue
        problem = _shape_problem(path, module, shape, module_kind)
        if problem:
            problems.append(problem)
        else:
            bases[path] = module
    if not problems and strict_base:
        problems = _weight_problems(fp, bases, source, module_kind)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise IncompatibleBaseModelError(
            f"the adapter in {source} was saved for a different base model: {shown}. "
            "Load it into the base model it was trained on."
        )
    return list(modules)


def _weight_problems(fp: dict, modules: dict[str, nn.Module], source: str, module_kind: bool) -> list[str]:
    saved = fp.get("weights")
    if not isinstance(saved, dict):
        raise IncompatibleBaseModelError(
            f"strict_base=True: {source} records no hashes of the base weights (it was saved by an older "
            "lava-peft, or by hand); it can be checked by module names and shapes only. Load it without "
            "strict_base, or save it again with this lava-peft from the base model it was trained on"
        )
    problems = []
    for path, module in modules.items():
        recorded = saved.get(path)
        if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
            raise IncompatibleBaseModelError(
                f"strict_base=True: {source} has no hash of the base weight of {path} (the adapter was merged "
                "without a backup when it was saved, or the file was edited). Load it without strict_base, or "
                "save it unmerged"
            )
        if module_kind:
            here = module_digest(module)
            if here is None:
                problems.append(f"{path}: a weight inside it is on the meta device or merged without a backup, "
                                "so it cannot be compared")
            elif here["sha256"] != recorded["sha256"]:
                problems.append(f"{path}: the bytes of its weights differ from the saved base model's")
            continue
        if isinstance(module, AdaptedLayer):
            weight = _unmerged_weight(module)
            if weight is None:
                raise IncompatibleBaseModelError(
                    f"strict_base=True: {path} holds merged adapters without a backup, so its base weights cannot "
                    "be hashed; unmerge first (model.unmerge_adapter()) or set model.exact_unmerge = True before merging"
                )
        else:
            weight = module.weight
        here = weight_digest(weight)
        if here is None:
            problems.append(f"{path}: its weight is on the meta device (not loaded), so it cannot be compared")
        elif here["sha256"] != recorded["sha256"]:
            why = (f"dtype {here['dtype']} here, {recorded.get('dtype')} when saved"
                   if here["dtype"] != recorded.get("dtype") else "other values")
            problems.append(f"{path}: the weight's bytes differ from the saved base model's ({why})")
    return problems


__all__ = ["base_fingerprint", "check_base_fingerprint", "module_digest", "weight_digest"]
