"""The size of LAVA's first Adam step on ΔW, as stated in docs/choosing.md and lava_evidence.md §1b.

With the default init (``U`` orthonormal columns, ``V = 0``) only ``V`` has a gradient at step 0,
and Adam's first update is ``δV = −lr·g/(|g| + ε)``, i.e. ``±lr`` per entry (``|g| ≫ ε``).  As
``UᵀU = I``::

    ‖ΔW‖_F² = s² · Σ_j ‖p_j‖² · ‖δV_j‖² = s² · lr² · (I/groups) · Σ_j ‖p_j‖²

(``p_j = P1[j] ⊗ P2[j]``, the component's spatial kernel)

— independent of the gradient's size.  With ``init="lora"`` (``U = 0``, ``V`` random) the roles
swap: ``ΔW = s · δU · [v_j ⊗ p_j]`` with ``δU = ±lr`` per entry, ``O`` rows of them (LoRA's
``s · δB · A``).  Both are checked against one real AdamW step.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lava_peft as lp


def _one_adam_step(conv: nn.Module, init: str, lr: float):
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(conv), lp.LavaConfig(r=4, alpha=8, target_modules="all-conv", init=init,
                                                        orth_lambda=0.0))
    adapter = model.adapter_layers("default")[0][1]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    x = torch.randn(3, conv.in_channels, 6, 6)
    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    model(x).pow(2).mean().backward()
    opt.step()
    return adapter, before


def _spatial(before: dict, r: int) -> torch.Tensor:
    """``(r, ΠK)``: each component's spatial kernel ``P1[j] ⊗ P2[j]`` at init."""
    p1, p2 = before["lava_P.0"], before["lava_P.1"]
    return (p1[:, :, None] * p2[:, None, :]).reshape(r, -1)


@pytest.mark.parametrize("conv", [lambda: nn.Conv2d(6, 10, 1), lambda: nn.Conv2d(8, 8, 3, groups=8),
                                  lambda: nn.Conv2d(5, 7, 3)], ids=["pointwise", "depthwise", "dense"])
def test_default_first_step_is_set_by_the_shape_not_the_gradient(conv):
    lr = 1e-3
    adapter, before = _one_adam_step(conv(), "orthogonal", lr)
    assert torch.count_nonzero(before["lava_V"]) == 0
    step_v = adapter.lava_V.detach() - before["lava_V"]
    torch.testing.assert_close(step_v.abs(), torch.full_like(step_v, lr), rtol=1e-3, atol=0)  # ±lr per entry
    for name in ("lava_U", "lava_P.0", "lava_P.1"):  # no gradient reaches them at step 0
        torch.testing.assert_close(dict(adapter.named_parameters())[name].detach(), before[name])
    r, I = adapter.r, adapter.spec.in_dim
    p_sq = _spatial(before, r).pow(2).sum(1)  # Σ_k of the component's spatial kernel squared
    expected = adapter.scale * lr * math.sqrt(I * p_sq.sum().item())
    assert adapter.delta_weight().norm().item() == pytest.approx(expected, rel=1e-3)


def test_lora_roles_first_step_scales_with_the_output_dim():
    lr = 1e-3
    adapter, before = _one_adam_step(nn.Conv2d(5, 7, 3), "lora", lr)
    step_u = adapter.lava_U.detach() - before["lava_U"]
    torch.testing.assert_close(step_u.abs(), torch.full_like(step_u, lr), rtol=1e-3, atol=0)
    r, O = adapter.r, adapter.spec.out_dim
    rows = (before["lava_V"][:, :, None] * _spatial(before, r)[:, None, :]).reshape(r, -1)  # v_j ⊗ p_j
    # ΔW = s·δU·rows with δU = ±lr: compute it from the signs of the actual step (an independent product)
    delta = adapter.scale * torch.sign(step_u) * lr @ rows
    torch.testing.assert_close(adapter.delta_weight().reshape(O, -1), delta, rtol=1e-3, atol=1e-8)
