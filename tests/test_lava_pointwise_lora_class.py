"""On a 1×1 conv LAVA (CP) and LoRA have the same function class: constructive maps both ways.

LoRA on a 1×1 conv: ``ΔW = s_B · B A`` (B ∈ R^{O×r}, A ∈ R^{r×I}).  LAVA CP:
``ΔW = s_L · U diag(P1[:,0] · P2[:,0]) V``.  So

* LoRA → LAVA: ``U = (s_B / s_L) · B``, ``V = A``, ``P1 = P2 = 1``;
* LAVA → LoRA: ``B = (s_L / s_B) · U diag(P1[:,0] · P2[:,0])``, ``A = V``.

Each test sets a random state of one adapter, builds the other adapter's factors by the map
above, and compares the two adapted models' outputs (and ``ΔW``) with each other and with a
plain conv that uses ``W0 + ΔW`` from the formula — for both of LAVA's conv execution paths.
The alphas differ on purpose, so the scale ratio ``s_B / s_L`` is part of what is checked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lava_peft as lp

O, I, R = 12, 10, 3


def _pair(conv_path: str):
    torch.manual_seed(0)
    base = nn.Conv2d(I, O, 1, stride=2, padding=1)
    lava_model = lp.adapt(nn.Sequential(base), lp.LavaConfig(r=R, alpha=5, target_modules="all-conv",
                                                             conv_path=conv_path))
    twin = nn.Conv2d(I, O, 1, stride=2, padding=1)
    twin.load_state_dict(base.state_dict())
    lora_model = lp.adapt(nn.Sequential(twin), lp.LoraConfig(r=R, alpha=7, target_modules="all-conv"))
    lava = lava_model.adapter_layers("default")[0][1]
    lora = lora_model.adapter_layers("default")[0][1]
    assert lava.scale == pytest.approx(5 / R) and lora.scale == pytest.approx(7 / R)
    return base, lava_model, lava, lora_model, lora


def _reference(base: nn.Conv2d, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    w = base.weight + delta.reshape(O, I, 1, 1)
    return F.conv2d(x, w, base.bias, stride=2, padding=1)


@pytest.mark.parametrize("conv_path", ["weight", "separable"])
def test_every_lora_state_on_a_1x1_conv_is_a_lava_state(conv_path):
    base, lava_model, lava, lora_model, lora = _pair(conv_path)
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(O, R, generator=g), torch.randn(R, I, generator=g)
    with torch.no_grad():
        lora.lora_B.copy_(B)
        lora.lora_A.copy_(A)
        lava.lava_U.copy_(B * (lora.scale / lava.scale))
        lava.lava_V.copy_(A)
        for p in lava.lava_P:
            p.fill_(1.0)
    x = torch.randn(2, I, 7, 7, generator=g)
    expected_delta = lora.scale * B @ A
    with torch.no_grad():
        torch.testing.assert_close(lava.delta_weight().reshape(O, I), expected_delta, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lava_model(x), lora_model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lava_model(x), _reference(base, expected_delta, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv_path", ["weight", "separable"])
def test_every_lava_state_on_a_1x1_conv_is_a_lora_state(conv_path):
    base, lava_model, lava, lora_model, lora = _pair(conv_path)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in lava.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        component_scale = lava.lava_P[0][:, 0] * lava.lava_P[1][:, 0]
        assert component_scale.shape == (R,) and (component_scale.abs() != 1).all()  # not the trivial case
        B = lava.lava_U * component_scale * (lava.scale / lora.scale)
        lora.lora_B.copy_(B)
        lora.lora_A.copy_(lava.lava_V)
    x = torch.randn(2, I, 7, 7, generator=g)
    expected_delta = lava.scale * (lava.lava_U * component_scale) @ lava.lava_V
    with torch.no_grad():
        torch.testing.assert_close(lora.delta_weight().reshape(O, I), expected_delta, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lora_model(x), lava_model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lava_model(x), _reference(base, expected_delta, x), rtol=1e-5, atol=1e-5)
        rank = torch.linalg.matrix_rank((lava.lava_U * component_scale).double() @ lava.lava_V.double())
        assert rank == R  # exactly rank r (computed in fp64): the map is not degenerate
