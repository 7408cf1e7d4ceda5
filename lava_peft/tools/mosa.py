"""MoSA on a whole model: module control, ``merge_modules`` and the consistency objective.

These operate on an :class:`~lava_peft.AdaptedModel` (or its DDP wrapper) holding a MoSA
adapter (:mod:`lava_peft.methods.mosa` defines the adapter itself).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..errors import LavaConfigError, LavaError
from ..methods.lava import LavaConfig
from ..methods.lora import LoraConfig
from ..methods.mosa import ModuleSampler, MosaConfig, _check_module
from ..train.checkpoint import unwrap
from ..train.trainer import classification_loss, default_forward
from ._common import adapter_of_method


def _unwrap(model):
    return unwrap(model)


def _mosa(model, adapter_name: str | None):
    """``(name, config, [(path, adapter)])`` of a MoSA adapter of ``model``."""
    return adapter_of_method(_unwrap(model), adapter_name, MosaConfig, "this")


def module_sampler(model, adapter_name: str | None = None) -> ModuleSampler:
    """The :class:`ModuleSampler` shared by the layers of a MoSA adapter (``.step`` to inspect or resume)."""
    _, _, layers = _mosa(model, adapter_name)
    return layers[0][1]._sampler


def set_module(model, k: int | None, adapter_name: str | None = None) -> None:
    """Make every layer of MoSA adapter ``adapter_name`` use module ``k`` in training forwards
    (``None``: random draws again).  Evaluation always uses the merged (full) adapter.
    Raises :class:`LavaConfigError` (changing nothing) for ``k`` outside ``[0, n_modules)``."""
    _, config, layers = _mosa(model, adapter_name)
    if k is not None:
        _check_module(k, config.n_modules, "set_module")
    layers[0][1]._sampler.fixed = k


def merge_modules(model, adapter_name: str | None = None) -> LoraConfig | LavaConfig:
    """Turn MoSA adapter ``adapter_name`` into the plain ``"lora"`` / ``"lava"`` adapter of its full factors.

    The sum of the modules is the full factors, so each layer gets a plain adapter with the
    same tensors (same name, rank, scale, dropout; ``modules_to_save`` copies and the
    active / merged / trainable state are kept).  Its outputs equal the MoSA adapter's
    evaluation outputs bit for bit; it saves, loads in any lava-peft and exports to HF PEFT
    (:func:`lava_peft.interop.export_peft`) like any plain adapter.  Training it further is
    dense (plain) training.  Returns the new config; nothing changes on error.
    """
    model = _unwrap(model)
    name, config, layers = _mosa(model, adapter_name)
    plain = config.plain_config()
    new = {}
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the plain init's draws are overwritten
        for path, old in layers:
            adapter = old.plain_class(old.spec, plain, path)
            adapter.load_state_dict(old.state_dict())
            adapter.to(device=old.factor(old._UP).device)
            adapter.train(old.training)
            new[path] = adapter
    model.replace_adapter(name, plain, new)  # requires_grad by name, as for any adapter
    return plain


# =============================================================================== consistency objective
class ConsistencyOutput(NamedTuple):
    """``loss``: the symmetric KL between the two forwards; ``logits_a`` / ``logits_b``: their outputs."""

    loss: torch.Tensor
    logits_a: torch.Tensor
    logits_b: torch.Tensor


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``½[KL(p_a‖p_b) + KL(p_b‖p_a)] = ½ Σ_c (p_a − p_b)(log p_a − log p_b)`` per row, averaged over rows.

    Rows are all leading dimensions (``[B, C]`` or token-level ``[B, T, C]``); ``mask``
    (the rows' shape) keeps only the rows where it is true.  Computed in fp32 from
    ``log_softmax``; 0 (with a gradient) when no row is kept.
    """
    if logits_a.shape != logits_b.shape:
        raise LavaConfigError(f"symmetric_kl needs logits of equal shape; got {tuple(logits_a.shape)} and "
                              f"{tuple(logits_b.shape)}")
    a = logits_a.float().reshape(-1, logits_a.shape[-1])
    b = logits_b.float().reshape(-1, logits_b.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1).to(device=a.device, dtype=torch.bool)
        a, b = a[keep], b[keep]
    if a.shape[0] == 0:
        return (a.sum() + b.sum()) * 0.0
    la, lb = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
    return 0.5 * ((la.exp() - lb.exp()) * (la - lb)).sum(-1).mean()


def _active_samplers(model, adapter_name: str | None) -> list[tuple[ModuleSampler, list]]:
    if adapter_name is not None:
        _, _, layers = _mosa(model, adapter_name)
        return [(layers[0][1]._sampler, [a for _, a in layers])]
    out = []
    for name in model.active_adapters:
        if isinstance(model.peft_config[name], MosaConfig):
            layers = [a for _, a in model.adapter_layers(name)]
            out.append((layers[0]._sampler, layers))
    if not out:
        raise LavaConfigError(
            f"the model has no active MoSA adapter (active: {model.active_adapters}); the consistency loss needs one"
        )
    return out


def mosa_consistency_loss(model, batch, forward_fn: Callable | None = None, adapter_name: str | None = None,
                          modules: tuple[int, int] | None = None) -> ConsistencyOutput:
    """Two training forwards of ``batch`` with different modules and the symmetric KL between them.

    Forward A draws its modules as usual; forward B uses, in every layer, a module drawn
    uniformly among the ``N − 1`` others (``modules=(ka, kb)`` instead fixes module ``ka``
    then ``kb`` in every layer).  Base-model dropout also differs between the two, as in
    R-Drop.  The reference objective is ``CE(logits_a, y) + 1.0·loss`` (no CE on B):
    :func:`mosa_loss_fn` builds it for :class:`lava_peft.Trainer`.

    Args:
        model: the :class:`~lava_peft.AdaptedModel` (or its DDP wrapper), in training mode.
        batch: what ``forward_fn`` takes.
        forward_fn: ``forward_fn(model, batch) -> logits``; default
            :func:`lava_peft.train.trainer.default_forward`.
        adapter_name: the MoSA adapter whose modules differ; default every active MoSA adapter.
        modules: ``(ka, kb)`` to fix both forwards' modules (``ka == kb`` gives a KL of 0
            without base dropout).

    Token-level logits ``[B, T, C]`` with ``batch["labels"]`` of shape ``[B, T]`` skip the rows
    labelled ``-100``.  Activation checkpointing is refused: its recomputation would run
    forward A with forward B's modules.
    """
    forward_fn = forward_fn or default_forward
    inner = _unwrap(model)
    groups = _active_samplers(inner, adapter_name)
    if not all(a.training for _, layers in groups for a in layers):
        raise LavaError("mosa_consistency_loss compares two training forwards; call model.train() first "
                        "(in eval mode both forwards use the merged adapter)")
    if any(getattr(m, "gradient_checkpointing", False) is True for m in inner.modules()):  # transformers' flag
        raise LavaConfigError(
            "mosa_consistency_loss runs two forwards with different modules before one backward; activation "
            "checkpointing would recompute forward A with forward B's modules. Disable gradient checkpointing "
            "or train without the consistency term"
        )
    if modules is not None:
        if not isinstance(modules, (tuple, list)) or len(modules) != 2:
            raise LavaConfigError(f"modules must be a pair (ka, kb); got {modules!r}")
        for sampler, _ in groups:
            for k in modules:
                _check_module(k, sampler.n_modules, "mosa_consistency_loss(modules=...)")
    before = [sampler.fixed for sampler, _ in groups]
    try:
        if modules is not None:
            for sampler, _ in groups:
                sampler.fixed = modules[0]
        logits_a = forward_fn(model, batch)
        for sampler, layers in groups:
            if modules is not None:
                sampler.fixed = modules[1]
            else:
                sampler.avoid = {a._index: a.last_module for a in layers if a.last_module is not None}
        logits_b = forward_fn(model, batch)
    finally:
        for (sampler, _), fixed in zip(groups, before):
            sampler.avoid = None
            sampler.fixed = fixed
    mask = None
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if isinstance(labels, torch.Tensor) and logits_a.dim() > 2 and tuple(labels.shape) == tuple(logits_a.shape[:-1]):
        mask = labels != -100
    return ConsistencyOutput(symmetric_kl(logits_a, logits_b, mask), logits_a, logits_b)


def mosa_loss_fn(weight: float = 1.0, forward_fn: Callable | None = None,
                 task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 adapter_name: str | None = None) -> Callable:
    """A ``loss_fn(model, batch) -> (loss, logits)`` for :class:`lava_peft.Trainer` (its objective hook).

    Training: ``task_loss(logits_a, labels) + weight · symmetric KL`` from
    :func:`mosa_consistency_loss` (logits of forward A are reported).  Evaluation (the
    model in eval mode): ``task_loss`` of one forward with the merged adapter.  Defaults:
    ``default_forward`` and ``classification_loss`` of :mod:`lava_peft.train.trainer`.
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise LavaConfigError(f"mosa_loss_fn weight must be a finite number >= 0; got {weight!r}")

    def loss_fn(model, batch):
        fwd = forward_fn or default_forward
        task = task_loss or classification_loss
        if not model.training:
            logits = fwd(model, batch)
            return task(logits, batch["labels"]), logits
        out = mosa_consistency_loss(model, batch, fwd, adapter_name)
        return task(out.logits_a, batch["labels"]) + weight * out.loss, out.logits_a

    return loss_fn


__all__ = ["ConsistencyOutput", "merge_modules", "module_sampler", "mosa_consistency_loss", "mosa_loss_fn", "set_module",
           "symmetric_kl"]
