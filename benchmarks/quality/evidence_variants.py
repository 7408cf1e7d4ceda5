"""The adapter variants of the LAVA-evidence benchmark (issue 18), each a function of the task.

Every variant returns ``(model, info)`` where ``model`` is the adapted model and ``info``
holds the rank and, optionally, ``lr_scale``: ``{parameter-name substring: factor}`` for
per-factor learning rates.  Budgets: LoRA r = 8 on every target (alpha = 2r, rank capped at
the layer's limit); LAVA CP and LAVA Tucker-2 at the rank whose total adapter count is
closest to LoRA's (alpha = 2r, so the same scale 2 everywhere).

Ablation variants change exactly one thing against ``lava`` (CP, U orthonormal, V = 0,
spatial factors N(0, 1/k), λ = 0.1 on U):

* ``lava_l0`` / ``lava_l001`` / ``lava_l1``: λ = 0 / 0.01 / 1;
* ``lava_initlora``: LoRA's roles (V Kaiming-uniform, U = 0; λ then acts on Vᵀ);
* ``lava_urand``: U Gaussian with std 1/√O (columns of unit norm on average, not orthogonal), V = 0;
* ``lava_fold1x1``: on 1×1 convs the spatial factors are fixed to 1 and frozen (LAVA there
  is then exactly LoRA's ``s·U V``);
* ``lava_dwlora``: depthwise convs get LoRA-conv r = 8 (flattened ``O × K·K``) instead of CP;
* ``lava_lrP``: the spatial factors ``P_k`` train at 0.1× the adapter lr;
* ``lava_lrU4``: a LoRA+-style ratio: the output factor ``U`` trains at 4× the adapter lr;
* ``lava_vstep``: per-layer step matching (the scale check of issue 18).  Under Adam the first
  steps move every entry of the zero-initialised factor by about ±lr whatever the gradient's
  size, so the first change of ``ΔW`` is set by the *other* factors' norms.  Per component:
  LoRA (``B = 0``, ``A`` Kaiming-uniform, rows of squared norm 1/3) moves ``ΔW`` by
  ``s·lr·√(O/3)``; LAVA (``V = 0``, ``‖u_j‖ = 1``, ``E‖P_kj‖² = 1``) by ``s·lr·‖p_j‖·√I``
  (``I`` = in/groups).  The ratio ``√(3I/O)`` is 1/10–1/18 on depthwise convs (I = 1), about
  4 on 1×1 projections (I = 6·O) and 0.7 on 1×1 expansions.  This variant trains ``V`` of each
  layer at ``lr·√(O/(3I))``, which gives LAVA's first step LoRA's size in every layer
  (``init="lora"`` has it by construction: its step is ``s·lr·‖p_j‖·√(O/3)``).
* ``dora`` / ``lava_dora``: LoRA r = 8 / LAVA CP with ``use_dora=True`` (DoRA's magnitude
  vector adds ``O`` parameters per layer on top of the matched budget).

``info["lr_scale_params"]`` (``{id(parameter): factor}``) sets a factor for single tensors.
"""

from __future__ import annotations

import math

import torch

import lava_peft as lp
from lava_peft.inject import find_targets
from lava_peft.layers import layer_ops
from lava_peft.methods.lava import LavaAdapter
from lava_peft.methods.tucker_conv import tucker_max_rank, tucker_params

from .budget import lava_params, lora_params, lora_rank_limit, matching_rank, rank_caps

LORA_RANK = 8


def _specs(model, targets, heads):
    probe = lp.LoraConfig(r=LORA_RANK, target_modules=targets, modules_to_save=heads)
    return [(n, layer_ops(m).spec(m)) for n, m in find_targets(model, probe)]


def _tucker_count(spec, r: int) -> int:
    if spec.kind != "conv":
        return lava_params(spec, r)
    return tucker_params(spec, min(r, tucker_max_rank(spec)))


def lora(task, targets, lam=None):
    specs = _specs(task.model, targets, task.heads)
    caps = rank_caps(specs, LORA_RANK, lora_rank_limit)
    cfg = lp.LoraConfig(r=LORA_RANK, alpha=2 * LORA_RANK, target_modules=targets, modules_to_save=task.heads,
                        rank_pattern=caps)
    return lp.adapt(task.model, cfg), {"rank": LORA_RANK}


def _lava(task, targets, factorization="cp", **fields):
    specs = _specs(task.model, targets, task.heads)
    budget = sum(lora_params(s, LORA_RANK) for _, s in specs)
    if factorization == "tucker":
        r = matching_rank(specs, _tucker_count, budget)[0]
        caps = {}
    else:
        r = matching_rank(specs, lava_params, budget)[0]
        caps = rank_caps(specs, r, LavaAdapter.max_rank_for)
    fields.setdefault("orth_lambda", 0.1)
    cfg = lp.LavaConfig(r=r, alpha=2 * r, target_modules=targets, modules_to_save=task.heads, rank_pattern=caps,
                        factorization=factorization, **fields)
    return lp.adapt(task.model, cfg), {"rank": r}


def lava(task, targets):
    return _lava(task, targets)


def lava_tucker(task, targets):
    return _lava(task, targets, factorization="tucker")


def _lam(value):
    return lambda task, targets: _lava(task, targets, orth_lambda=value)


def lava_initlora(task, targets):
    return _lava(task, targets, init="lora")


def _lava_adapters(model):
    return [a for _, a in model.adapter_layers("default")]


def lava_urand(task, targets):
    model, info = _lava(task, targets)
    with torch.no_grad():
        for a in _lava_adapters(model):
            a.lava_U.normal_(0.0, 1.0 / math.sqrt(a.lava_U.shape[0]))
    return model, info


def lava_fold1x1(task, targets):
    model, info = _lava(task, targets)
    with torch.no_grad():
        for a in _lava_adapters(model):
            if a.spec.kind == "conv" and all(k == 1 for k in a.spec.kernel_size):
                for p in a.lava_P:
                    p.fill_(1.0)
                    p.requires_grad_(False)
    return model, info


def lava_dwlora(task, targets):
    """CP on every conv except the depthwise ones, LoRA r = 8 (flattened) there: two adapters, both active."""
    model = task.model
    specs = _specs(model, targets, task.heads)
    depthwise = [n for n, s in specs if s.kind == "conv" and s.in_dim == 1]
    dense = [n for n, s in specs if n not in depthwise]
    budget = sum(lora_params(s, LORA_RANK) for _, s in specs)
    budget -= sum(lora_params(s, LORA_RANK) for n, s in specs if n in depthwise)
    r = matching_rank([(n, s) for n, s in specs if n in dense], lava_params, budget)[0]
    caps = rank_caps([(n, s) for n, s in specs if n in dense], r, LavaAdapter.max_rank_for)
    cfg = lp.LavaConfig(r=r, alpha=2 * r, target_modules=targets, modules_to_save=task.heads, rank_pattern=caps,
                        orth_lambda=0.1)
    adapted = lp.AdaptedModel(model)
    adapted.commit(adapted.plan("default", cfg, target_names=dense))
    lcfg = lp.LoraConfig(r=LORA_RANK, alpha=2 * LORA_RANK, target_modules=targets)
    adapted.commit(adapted.plan("dw", lcfg, target_names=depthwise))
    adapted.set_adapter(["default", "dw"])
    return adapted, {"rank": r}


def lava_lrP(task, targets):
    model, info = _lava(task, targets)
    info["lr_scale"] = {"lava_P": 0.1}
    return model, info


def lava_lrU4(task, targets):
    model, info = _lava(task, targets)
    info["lr_scale"] = {"lava_U": 4.0}
    return model, info


def vstep_factor(spec) -> float:
    """``√(O/(3·I))`` (I = in/groups): the lr factor on ``V`` that gives LAVA's first Adam step on ``ΔW``
    LoRA's size (see the module docstring)."""
    return math.sqrt(spec.out_dim / (3.0 * spec.in_dim))


def lava_vstep(task, targets):
    model, info = _lava(task, targets)
    info["lr_scale_params"] = {id(a.lava_V): vstep_factor(a.spec) for a in _lava_adapters(model)}
    return model, info


def dora(task, targets):
    specs = _specs(task.model, targets, task.heads)
    caps = rank_caps(specs, LORA_RANK, lora_rank_limit)
    cfg = lp.LoraConfig(r=LORA_RANK, alpha=2 * LORA_RANK, target_modules=targets, modules_to_save=task.heads,
                        rank_pattern=caps, use_dora=True)
    return lp.adapt(task.model, cfg), {"rank": LORA_RANK}


def lava_dora(task, targets):
    return _lava(task, targets, use_dora=True)


VARIANTS = {
    "lora": lora, "lava": lava, "lava_tucker": lava_tucker,
    "lava_l0": _lam(0.0), "lava_l001": _lam(0.01), "lava_l1": _lam(1.0),
    "lava_initlora": lava_initlora, "lava_urand": lava_urand, "lava_fold1x1": lava_fold1x1,
    "lava_dwlora": lava_dwlora, "lava_lrP": lava_lrP, "lava_lrU4": lava_lrU4, "lava_vstep": lava_vstep,
    "dora": dora, "lava_dora": lava_dora,
}
LABELS = {
    "lora": "LoRA (flattened on convs)", "lava": "LAVA CP λ=0.1 (default)", "lava_tucker": "LAVA Tucker-2 λ=0.1",
    "lava_l0": "LAVA CP λ=0", "lava_l001": "LAVA CP λ=0.01", "lava_l1": "LAVA CP λ=1",
    "lava_initlora": "LAVA CP, LoRA roles (V random, U=0)", "lava_urand": "LAVA CP, U Gaussian (not orthonormal)",
    "lava_fold1x1": "LAVA CP, 1×1 spatial factors fixed to 1", "lava_dwlora": "LAVA CP, LoRA on depthwise convs",
    "lava_lrP": "LAVA CP, spatial factors at 0.1× lr", "lava_lrU4": "LAVA CP, U at 4× lr (LoRA+-style)",
    "lava_vstep": "LAVA CP, V lr ×√(O/3I) per layer (LoRA's first step)",
    "dora": "DoRA (LoRA r=8 + magnitude)", "lava_dora": "LAVA CP + DoRA magnitude",
}
