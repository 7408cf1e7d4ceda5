"""Mask inputs that need the model: calibration gradients (``grad``/``snip``) and phase-1 weight changes (LT-SFT).

The mask builders themselves (pure functions of a :class:`~lava_peft.methods.sparse_masks.MaskInputs`)
are in :mod:`lava_peft.methods.sparse_masks`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import LavaConfigError, LavaError
from ..layers import AdaptedLayer
from ..model import AdaptedModel


def _target_weights(model: nn.Module, targets) -> dict[str, torch.Tensor]:
    """``{key: weight parameter}``: ``targets`` maps keys to parameters, or lists module paths of
    ``model`` (an adapted layer's *base* weight is used; an ``AdaptedModel`` is looked into)."""
    if isinstance(targets, Mapping):
        return dict(targets)
    root = model.model if isinstance(model, AdaptedModel) else model
    out = {}
    for path in targets:
        try:
            module = root.get_submodule(path)
        except AttributeError:
            raise LavaConfigError(f"calibration target {path!r} is not a module of the model") from None
        weight = module.base_weight if isinstance(module, AdaptedLayer) else getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise LavaConfigError(f"calibration target {path!r} ({type(module).__name__}) has no weight")
        out[path] = weight
    return out


def calibration_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    targets: Sequence[str] | Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``{target: Σ_b |∂ loss_fn(model, batch_b) / ∂W|}`` (fp32, the weight's own layout).

    Only the targeted weights are made to require grad (every other parameter is frozen
    meanwhile, so no other gradient is computed), and the gradients are taken with
    ``torch.autograd.grad`` — no ``.grad`` attribute is written.  Every parameter's
    ``requires_grad`` is restored in a ``finally``, also when ``loss_fn`` raises.  The
    model's train/eval mode is left as it is (use ``model.eval()`` for a deterministic
    calibration).

    Args:
        model: any module (``loss_fn`` receives it).
        batches: an iterable of batches (at least one).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        targets: module paths (their ``weight``; for adapted layers the base weight) or
            ``{key: weight tensor}``.
    """
    weights = _target_weights(model, targets)
    params = dict.fromkeys([*model.parameters(), *weights.values()])
    before = {p: p.requires_grad for p in params}
    sums = {k: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for k, w in weights.items()}
    seen = {k: False for k in weights}
    n_batches = 0
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        keys = list(weights)
        for batch in batches:
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise LavaConfigError("loss_fn(model, batch) must return a scalar loss tensor")
            if not loss.requires_grad:
                raise LavaError("the calibration loss does not depend on any targeted weight; check loss_fn and "
                                "targets")
            grads = torch.autograd.grad(loss, [weights[k] for k in keys], allow_unused=True)
            for k, g in zip(keys, grads):
                if g is not None:
                    sums[k] += g.detach().float().abs()
                    seen[k] = True
            n_batches += 1
    finally:
        for p, flag in before.items():
            p.requires_grad_(flag)
    if n_batches == 0:
        raise LavaConfigError("calibration needs at least one batch; batches was empty")
    unused = [k for k, s in seen.items() if not s]
    if unused:
        raise LavaError(f"the calibration loss does not depend on {unused[:3]}; check loss_fn and the targets")
    for k, s in sums.items():
        if not bool(torch.isfinite(s).all()):
            raise LavaError(f"calibration gradients of {k} are not finite; lower the loss scale or check the batches")
    return sums


def weight_changes(
    model: nn.Module,
    train_fn: Callable[[nn.Module], Any],
    targets: Sequence[str] | Mapping[str, torch.Tensor],
    also_train: Iterable[torch.Tensor] = (),
) -> dict[str, torch.Tensor]:
    """``{target: θ1 − θ0}`` (fp32, the weight's own layout) after ``train_fn(model)`` trains
    the targeted weights densely; the model is then put back exactly as it was.

    While ``train_fn`` runs, the targeted weights (and the tensors of ``also_train``, e.g.
    a new classifier head) are the only parameters that require grad, and every ``.grad``
    starts at ``None``.  Afterwards — in a ``finally``, so also when ``train_fn`` raises —
    every parameter and buffer of ``model`` gets back its value (bit for bit, in place),
    its tensor object, its ``requires_grad`` and its ``.grad``, and every module its
    train/eval mode.  This needs one copy of the model's parameters and buffers.  A model
    that ``train_fn`` moved to another device stays there.

    Args:
        model: any module (``train_fn`` receives it).
        train_fn: ``train_fn(model)`` runs phase 1: it builds its optimizer over the
            parameters that require grad and takes some steps (its result is ignored).
        targets: module paths (their ``weight``; for adapted layers the base weight) or
            ``{key: weight tensor}``, as in :func:`calibration_gradients`.
        also_train: further tensors trained in phase 1 and restored afterwards.
    """
    weights = _target_weights(model, targets)
    for key, w in weights.items():
        if not w.is_floating_point():
            raise LavaConfigError(f"the weight of {key!r} has dtype {w.dtype}; a dense training phase needs a "
                                  "floating-point weight (build the masks on the unquantized model)")
    trained = list(dict.fromkeys([*weights.values(), *also_train]))
    slots = [(m, kind, name, t) for m in model.modules() for kind in ("_parameters", "_buffers")
             for name, t in getattr(m, kind).items() if t is not None]
    tensors = list(dict.fromkeys([*(t for *_, t in slots), *trained]))
    saved = {t: (t.detach().clone(), t.requires_grad, t.grad) for t in tensors}
    modes = [(m, m.training) for m in model.modules()]
    changes: dict[str, torch.Tensor] = {}
    try:
        for t in tensors:
            if isinstance(t, nn.Parameter):
                t.requires_grad_(False)
                t.grad = None
        for t in trained:
            t.requires_grad_(True)
        train_fn(model)
        with torch.no_grad():
            changes = {k: w.detach().float() - saved[w][0].float() for k, w in weights.items()}
    finally:
        with torch.no_grad():
            for m, kind, name, t in slots:
                getattr(m, kind)[name] = t
            for t, (value, flag, grad) in saved.items():
                t.copy_(value)
                t.requires_grad_(flag)
                t.grad = grad if grad is None or grad.device == t.device else grad.to(t.device)
        for m, mode in modes:
            m.training = mode
    return changes


__all__ = ["calibration_gradients", "weight_changes"]
