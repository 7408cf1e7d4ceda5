"""LAVA-specific checks against independent computations."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import lava_peft as lp
from lava_peft.methods.lava import LavaAdapter, cp_einsum_equation, orth_penalty, orthonormal_factor


def _conv_net():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, groups=4, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 1),
        nn.ReLU(),
        nn.Conv2d(16, 16, (5, 3), stride=2),
        nn.Flatten(),
    )


def test_trainable_parameter_counts_equal_formula():
    torch.manual_seed(0)
    net = _conv_net()
    model = lp.adapt(net, lp.LavaConfig(r=4, target_modules="all-conv"))
    per_layer = {path: sum(p.numel() for p in a.parameters()) for path, a in model.adapter_layers()}
    # r * (O + I/groups + K1 + K2)
    assert per_layer == {
        "0": 4 * (16 + 3 + 3 + 3),
        "2": 4 * (16 + 4 + 3 + 3),
        "4": 4 * (16 + 16 + 1 + 1),
        "6": 4 * (16 + 16 + 5 + 3),
    }
    assert model.get_nb_trainable_parameters()[0] == sum(per_layer.values())
    lin = lp.adapt(nn.Sequential(nn.Linear(30, 20)), lp.LavaConfig(r=5, target_modules=["0"]))
    assert lin.get_nb_trainable_parameters()[0] == 5 * (30 + 20)
    conv3 = lp.adapt(nn.Sequential(nn.Conv3d(4, 6, (3, 2, 5))), lp.LavaConfig(r=3, target_modules=["0"]))
    assert conv3.get_nb_trainable_parameters()[0] == 3 * (6 + 4 + 3 + 2 + 5)


def test_cp_delta_equals_explicit_sum_of_outer_products():
    torch.manual_seed(1)
    model = lp.adapt(nn.Sequential(nn.Conv2d(5, 7, (3, 2))), lp.LavaConfig(r=3, alpha=6, target_modules=["0"]))
    adapter = model.model[0].adapters["default"]
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    U, V = adapter.lava_U.detach().numpy(), adapter.lava_V.detach().numpy()
    P, Q = (p.detach().numpy() for p in adapter.lava_P)
    expected = np.zeros((7, 5, 3, 2))
    for j in range(3):
        expected += np.einsum("o,i,a,b->oiab", U[:, j], V[j], P[j], Q[j])
    expected *= 6 / 3
    np.testing.assert_allclose(adapter.delta_weight().detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert cp_einsum_equation(1) == "oj,ji,ja->oia"
    assert cp_einsum_equation(3) == "oj,ji,ja,jb,jc->oiabc"


def _unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def test_trained_conv_delta_has_rank_at_most_r_in_every_mode_unfolding():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(6, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 10, 3))
    model = lp.adapt(net, lp.LavaConfig(r=2, target_modules="all-conv", orth_lambda=0.1))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x, y = torch.randn(4, 6, 8, 8), torch.randn(4, 10, 6, 6)
    for _ in range(10):
        opt.zero_grad()
        ((model(x) - y).pow(2).mean() + model.regularization_loss()).backward()
        opt.step()
    for _, adapter in model.adapter_layers():
        delta = adapter.delta_weight().detach().double()
        assert delta.abs().max() > 1e-3
        for mode in range(4):
            assert torch.linalg.matrix_rank(_unfold(delta, mode), rtol=1e-5).item() <= 2
        # the paper's (O*K1) x (I*K2) unfolding too
        O, I, K1, K2 = delta.shape
        assert torch.linalg.matrix_rank(delta.permute(0, 2, 1, 3).reshape(O * K1, I * K2), rtol=1e-5).item() <= 2


def test_regularizer_equals_independent_computation():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.Linear(6, 3))
    cfg = lp.LavaConfig(r=5, orth_lambda=0.3, target_modules=["0", "2", "3"], rank_pattern={"3": 3})
    model = lp.adapt(net, cfg)
    assert model.regularization_loss().item() == pytest.approx(0.0, abs=1e-10)  # orthonormal U at init
    with torch.no_grad():
        for _, a in model.adapter_layers():
            a.lava_U.normal_()
    terms = []
    for _, a in model.adapter_layers():
        U = a.lava_U.detach().double().numpy()
        d, r = U.shape
        # r > d: rows cannot all be orthonormal columns -> ||U U^T - I_d||^2
        gram = U.T @ U if r <= d else U @ U.T
        terms.append(((gram - np.eye(gram.shape[0])) ** 2).sum())
    expected = 0.3 * np.mean(terms)
    assert model.regularization_loss().item() == pytest.approx(expected, rel=1e-5)
    shapes = [tuple(a.lava_U.shape) for _, a in model.adapter_layers()]
    assert shapes == [(6, 5), (4, 5), (3, 3)]  # includes an r > O case (4 x 5)


def test_regularizer_gradient_matches_finite_differences():
    torch.manual_seed(4)
    for shape in [(7, 3), (3, 5)]:
        f = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: orth_penalty(t).double(), (f,))
    # the fp32 path: analytic gradient 4 U (U^T U - I) for r <= d
    u = torch.randn(8, 3, requires_grad=True)
    orth_penalty(u).backward()
    expected = 4 * u.detach() @ (u.detach().T @ u.detach() - torch.eye(3))
    torch.testing.assert_close(u.grad, expected, rtol=1e-5, atol=1e-5)


def test_orth_factor_choices():
    torch.manual_seed(5)
    spec_model = lp.adapt(nn.Sequential(nn.Conv2d(4, 6, 3)), lp.LavaConfig(r=2, orth_factors="all", target_modules=["0"]))
    a = spec_model.model[0].adapters["default"]
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    expected = sum(orth_penalty(f) for f in [a.lava_U, a.lava_V.T, a.lava_P[0].T, a.lava_P[1].T])
    torch.testing.assert_close(a.regularization(), expected)
    lora_init = lp.LavaConfig(r=2, init="lora", target_modules=["0"])
    assert lora_init.orth_factors == "in"


def test_orthonormal_init_and_zero_delta():
    for rows, cols in [(10, 4), (3, 6), (5, 5)]:
        q = orthonormal_factor(rows, cols)
        gram = q.T @ q if rows >= cols else q @ q.T
        torch.testing.assert_close(gram, torch.eye(min(rows, cols)), atol=1e-5, rtol=0)


def test_lava_linear_with_lambda_zero_is_bit_identical_to_lora():
    torch.manual_seed(6)
    base = nn.Sequential(nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 4))
    lava = lp.adapt(copy.deepcopy(base), lp.LavaConfig(r=4, alpha=8, orth_lambda=0.0, target_modules=["0", "2"]))
    lora = lp.adapt(copy.deepcopy(base), lp.LoraConfig(r=4, alpha=8, target_modules=["0", "2"]))
    with torch.no_grad():
        for (_, la), (_, lo) in zip(lava.adapter_layers(), lora.adapter_layers()):
            la.lava_U.normal_()
            la.lava_V.normal_()
            lo.lora_B.copy_(la.lava_U)
            lo.lora_A.copy_(la.lava_V)
    x = torch.randn(9, 16)
    out_lava, out_lora = lava(x), lora(x)
    assert torch.equal(out_lava, out_lora)
    assert lava.regularization_loss().item() == 0.0
    out_lava.sum().backward()
    out_lora.sum().backward()
    for (_, la), (_, lo) in zip(lava.adapter_layers(), lora.adapter_layers()):
        assert torch.equal(la.lava_U.grad, lo.lora_B.grad)
        assert torch.equal(la.lava_V.grad, lo.lora_A.grad)


def test_lora_conv_delta_equals_two_conv_composition():
    """PEFT's LoRA-conv: A = kernel-sized conv (I -> r), B = 1x1 conv (r -> O)."""
    torch.manual_seed(7)
    conv = nn.Conv2d(5, 6, 3, stride=2, padding=1, dilation=1)
    model = lp.adapt(nn.Sequential(copy.deepcopy(conv)), lp.LoraConfig(r=3, alpha=6, target_modules=["0"]))
    a = model.model[0].adapters["default"]
    with torch.no_grad():
        a.lora_B.normal_()
    x = torch.randn(2, 5, 9, 9)
    hidden = nn.functional.conv2d(x, a.lora_A.view(3, 5, 3, 3), stride=2, padding=1)
    expected = conv(x) + nn.functional.conv2d(hidden, a.lora_B.view(6, 3, 1, 1)) * 2.0
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", list(itertools.product([1, 2], [1, 3])))
def test_max_rank_bound(dims):
    O, K = dims[0] * 4, dims[1]
    from lava_peft.layers import LayerSpec

    spec = LayerSpec("conv", O, 2, (K, K))
    dims_all = (O, 2, K, K)
    assert LavaAdapter.max_rank_for(spec) == int(np.prod(dims_all)) // max(dims_all)
