"""SHiRA on a whole model: masks from the model's weights or gradients, and the HF PEFT SHiRA format.

:func:`with_masks` fills ``ShiraConfig.masks`` for the builders that read the model
(``weight_magnitude``, ``grad``, ``snip``); :func:`export_peft_shira` / :func:`import_peft_shira`
convert to and from a HF PEFT (0.21) SHiRA directory (reached through
:func:`lava_peft.interop.export_peft` / ``import_peft``: ``ShiraConfig`` names them as its
PEFT hooks).  The adapter itself is :mod:`lava_peft.methods.shira`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterFileError, IncompatibleBaseModelError, LavaConfigError
from ..inject import adapted_layers, find_targets
from ..adapter_files import WEIGHTS_NAME, write_adapter_dir
from ..layers import AdaptedLayer, layer_ops
from ..methods.base import LayerSpec
from ..methods.shira import ShiraAdapter, ShiraConfig, shira_budget
from ..methods.sparse_masks import MaskInputs, mask_builder, select_top
from ..model import AdaptedModel
from ..peft_common import base_layer_at, shira_flat_indices, shira_tensors
from ..train.trainer import classification_loss, default_forward
from .sparse_masks import calibration_gradients


def with_masks(model: nn.Module, config: ShiraConfig, batches=None, loss_fn=None) -> ShiraConfig:
    """``config`` with ``masks`` filled for every layer it targets, from the model's current weights.

    ``random``/``struct`` need nothing; ``weight_magnitude`` reads ``W``; ``grad``/``snip``
    accumulate ``|∇W|`` over ``batches`` with ``loss_fn(model, batch) -> loss``
    (:func:`~lava_peft.tools.sparse_masks.calibration_gradients`; the model is left as it
    was).  ``model`` is the base model or an :class:`~lava_peft.AdaptedModel` (then the
    base weights of adapted layers are used, as they are — merged adapters included).
    The result is passed to ``adapt``/``add_adapter`` unchanged.
    """
    config.validate()
    builder = mask_builder(config.mask_type)
    layers = mask_layers(model, config)
    grads = {}
    if "grad" in builder.needs:
        if batches is None or loss_fn is None:
            raise LavaConfigError(
                f"mask_type={config.mask_type!r} needs calibration gradients: pass batches=<iterable of batches> "
                "and loss_fn=<callable(model, batch) -> loss>"
            )
        grads = calibration_gradients(model, batches, loss_fn, {path: base.weight for path, base, *_ in layers})
    scores = layer_scores(layers, config, grad=grads)
    masks = {path: select_top(scores[path], budget, config.mask_slot).cpu() for path, *_, budget in layers}
    return dataclasses.replace(config, masks=masks)


def mask_layers(model: nn.Module, config: ShiraConfig) -> list[tuple[str, nn.Module, Any, LayerSpec, int]]:
    """``(path, base layer, layer ops, spec, budget)`` of every layer ``config`` targets, each checked
    (budget and mask slot fit).  ``model`` is the base model or an :class:`~lava_peft.AdaptedModel`
    (then the base layers of adapted layers)."""
    root = model.model if isinstance(model, AdaptedModel) else model
    layers = []
    for path, found in find_targets(root, config):
        base = found.base_layer if isinstance(found, AdaptedLayer) else found
        ops = layer_ops(base)
        spec = ops.spec(base)
        ShiraAdapter.check_layer(spec, config, path)
        layers.append((path, base, ops, spec, shira_budget(spec, config, path)))
    return layers


def layer_scores(layers, config: ShiraConfig, **per_layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{path: scores}`` of the builder ``config.mask_type`` for :func:`mask_layers`' layers (canonical layout).

    ``per_layer`` gives further :class:`~lava_peft.methods.sparse_masks.MaskInputs` fields as
    ``{path: tensor}`` in the weight's own layout (``grad=``, ``weight_change=``); the weight
    itself is read when the builder needs it.
    """
    builder = mask_builder(config.mask_type)
    out = {}
    for path, base, ops, spec, budget in layers:
        # the layer maps are transposes (their own inverses): to_base_layout also maps base -> canonical
        extra = {name: ops.to_base_layout(values[path]) for name, values in per_layer.items() if path in values}
        weight = ops.to_base_layout(base.weight.detach()).float() if "weight" in builder.needs else None
        out[path] = builder.scores(MaskInputs(spec.canonical_shape, budget, config.seed, weight=weight, **extra))
    return out


def export_peft_shira(model, save_directory: str, adapter_name: str | None = None,
                      base_model_name_or_path: str | None = None) -> None:
    """Write SHiRA adapter ``adapter_name`` as a HF PEFT (0.21) SHiRA directory.

    PEFT stores per module ``base_model.model.<path>.shira_weight`` (the values, scale 1) and
    ``shira_indices`` (``(2, nnz)`` int32 rows/columns, row-major — our sorted flat indices
    unravelled); ``α`` is folded into the values.  PEFT sizes every layer as ``r·(m + n)``
    with one ``r`` and adapts only ``nn.Linear``, so other layers, per-module budgets and
    ``modules_to_save`` are refused (before anything is written).
    """
    name = adapter_name or model.active_adapter
    model.check_known(name)
    fields, why = model.peft_shira_layout(name, scaled=True)
    if fields is None:
        raise LavaConfigError(f"cannot export adapter {name!r} as a PEFT SHiRA folder: {why}")
    tensors = {}
    for path, layer in adapted_layers(model.model):
        if name in layer.adapters:
            indices, values = layer.adapters[name].sparse_delta()  # values with α folded in
            tensors.update(shira_tensors(path, layer.spec.in_dim, indices, values))
    fields = {**fields, "base_model_name_or_path": base_model_name_or_path, "task_type": None}
    write_adapter_dir(Path(save_directory), fields, tensors, {"format": "pt"})


def import_peft_shira(model, directory: Path, peft_config: dict, tensors: dict[str, torch.Tensor],
                      adapter_name: str = "default", is_trainable: bool = False):
    """Load a HF PEFT SHiRA directory (``peft_type: "SHIRA"``) as a SHiRA adapter; the inverse of
    :func:`export_peft_shira`.  Called by :func:`lava_peft.interop.import_peft`.

    Per module, PEFT's ``shira_indices`` ``(2, nnz)`` (row, column) pairs become our sorted flat
    indices ``row·I + col`` and ``shira_weight`` the values, permuted the same way (scale 1).
    Everything is checked — keys, shapes, index range and uniqueness, that every module is an
    ``nn.Linear`` of the base model — before the model changes.
    """
    wrapped = model if isinstance(model, AdaptedModel) else AdaptedModel(model)
    base = wrapped.model
    weights_path = Path(directory) / WEIGHTS_NAME
    if peft_config.get("modules_to_save"):
        raise AdapterFileError(f"{directory}: PEFT SHiRA modules_to_save {peft_config['modules_to_save']} are not "
                               "supported by import_peft")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(shira_weight|shira_indices)", key)
        if m is None:
            raise AdapterFileError(f"{weights_path}: key {key!r} is not a PEFT SHiRA tensor")
        parts.setdefault(m.group(1), {})[m.group(2)] = value
    if not parts:
        raise AdapterFileError(f"{weights_path} contains no SHiRA tensors")
    masks, values, problems = {}, {}, []
    for path, pair in parts.items():
        if set(pair) != {"shira_weight", "shira_indices"}:
            raise AdapterFileError(f"{weights_path}: {path} has {sorted(pair)}, expected shira_weight and shira_indices")
        layer = base_layer_at(base, path, problems)
        if layer is None:
            continue
        if type(layer) is not nn.Linear:
            problems.append(f"{path}: {type(layer).__name__}, PEFT SHiRA adapts nn.Linear only")
            continue
        idx, weight = pair["shira_indices"], pair["shira_weight"]
        out_dim, in_dim = layer.weight.shape
        if idx.dim() != 2 or idx.shape[0] != 2 or weight.shape != (idx.shape[1],) or idx.is_floating_point():
            raise AdapterFileError(f"{weights_path}: {path} indices {tuple(idx.shape)} / values {tuple(weight.shape)} "
                                   "are not (2, nnz) / (nnz,)")
        rows, cols = idx[0].long(), idx[1].long()
        if idx.numel() and (rows.min() < 0 or cols.min() < 0 or rows.max() >= out_dim or cols.max() >= in_dim):
            raise AdapterFileError(f"{weights_path}: {path} indices fall outside the weight {out_dim}x{in_dim}")
        flat = shira_flat_indices(idx, in_dim)
        order = torch.argsort(flat)
        flat = flat[order]
        if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
            raise AdapterFileError(f"{weights_path}: {path} has repeated (row, column) pairs")
        masks[path], values[path] = flat, weight.float()[order]
    if problems:
        raise IncompatibleBaseModelError(f"the PEFT SHiRA adapter in {directory} does not fit this base model: "
                                         f"{'; '.join(problems[:5])}")
    config = ShiraConfig(
        target_modules="(?:" + "|".join(re.escape(p) for p in masks) + ")",
        r=int(peft_config.get("r", 32)), alpha=1.0, seed=int(peft_config.get("random_seed") or 0),
        budget_pattern={f"^{re.escape(p)}$": int(m.numel()) for p, m in masks.items()},
        masks=masks,
    )
    plan = wrapped.plan(adapter_name, config, target_names=list(masks))
    with torch.no_grad():
        for path, _, adapter in plan.layers:
            adapter.sparse_values.copy_(values[path])
    if not is_trainable:
        wrapped.inference_only.add(adapter_name)
    wrapped.commit(plan)
    wrapped.set_adapter(adapter_name)
    if not is_trainable:
        wrapped.eval()
    return wrapped




# =============================================================================== `lava train --method shira`
def calibration_batches(data: dict, batch_size: int, n_batches: int = 4) -> list[dict]:
    """The first ``n_batches`` training batches of a `lava train` task (for gradient-based masks)."""
    n = len(data["labels"])
    return [{k: v[i:i + batch_size] for k, v in data.items()} for i in range(0, min(n, n_batches * batch_size), batch_size)]


def _calibration_loss(model, batch):
    return classification_loss(default_forward(model, batch), batch["labels"])


def prepare_cli_config(config: ShiraConfig, opts: dict, task) -> ShiraConfig:
    """``ShiraConfig.cli_prepare``: masks that read the model (``|W|``, grad, SNIP) are built here."""
    if config.mask_type in ("random", "struct"):
        return config
    return with_masks(task.model, config, calibration_batches(task.train, opts["batch_size"]), _calibration_loss)


__all__ = ["calibration_batches", "export_peft_shira", "import_peft_shira", "layer_scores", "mask_layers",
           "prepare_cli_config", "with_masks"]
