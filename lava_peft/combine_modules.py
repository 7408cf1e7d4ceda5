"""Weighted combination of module adapters (the second adapter kind) by parameter averaging.

A module adapter is a nonlinear function of the activations, so ``Σ w_a·adapter_a`` has no
exact single-adapter form.  What is defined is the *parameter* combination: when every input
is the same kind of adapter with the same tensor shapes on the same modules (e.g. bottleneck
adapters trained from one init, "model soups"), the result has, per module and tensor,

    θ_result = Σ_a w_a · θ_a          (weights summing to 1: parameter averaging)

Quantized weights are combined on their latents (or frozen values) and re-quantized by the
result.  Only ``combination_type="linear"`` is defined; anything else (SVD, TIES, DARE: rules
for weight increments) is refused with the reason, as are mixed kinds, different placements
or shapes, before anything changes.
"""

from __future__ import annotations

import torch

from .combine import CombinationReport
from .errors import LavaConfigError
from .methods.base import ModuleAdapter


def involves_module_adapters(model, names) -> bool:
    return any(isinstance(a, ModuleAdapter) for n in names for _, a in model.adapter_layers(n))


def average_module_adapters(model, names: list[str], weights: list[float], adapter_name: str,
                            combination_type: str) -> CombinationReport:
    """Add ``adapter_name`` with parameters ``Σ w_a θ_a`` (module docstring); raises before any change."""
    if len(weights) != len(names):
        raise LavaConfigError(f"got {len(weights)} weights for {len(names)} adapters {names}; give one weight each")
    if combination_type != "linear":
        raise LavaConfigError(
            f"combination_type={combination_type!r} combines weight increments ΔW; module adapters {names} have none. "
            "Use combination_type='linear' (parameter averaging of adapters of equal shape)")
    layers = [dict(model.adapter_layers(n)) for n in names]
    if any(not all(isinstance(a, ModuleAdapter) for a in found.values()) for found in layers):
        raise LavaConfigError(f"adapters {names} mix module adapters and weight adapters; combine each kind separately")
    paths = list(layers[0])
    if any(list(found) != paths for found in layers[1:]):
        raise LavaConfigError(f"module adapters {names} adapt different modules; parameter averaging needs the same "
                              "placement")
    first = layers[0]
    for found in layers[1:]:
        bad = [p for p in paths if not first[p].averageable_with(found[p])]
        if bad:
            raise LavaConfigError(f"module adapters {names} differ in type or tensor shapes at {bad[:3]}; parameter "
                                  "averaging is defined only for adapters of the same shape")
    config = model.peft_config[names[0]]
    plan = model.plan(adapter_name, config, target_names=paths)
    with torch.no_grad():
        for path, _, adapter in plan.layers:
            for key, param in adapter.named_parameters():
                sources = [dict(found[path].named_parameters())[key] for found in layers]
                param.copy_(sum(w * p.detach().float() for w, p in zip(weights, sources)))
    model.commit(plan)
    return CombinationReport(adapter_name, config.method, combination_type,
                             ranks={p: getattr(first[p], "r", 0) for p in paths},
                             relative_error={p: 0.0 for p in paths})

