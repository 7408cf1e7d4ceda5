"""The fast paths of merging and switching: unaligned (memory-mapped) base weights get an aligned copy of
their own before the in-place GEMM, and the finiteness of all increments is checked in one reduction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lava_peft as lp
from lava_peft.layers import all_finite
from _tiny_models import randomize_adapters


def _model_with_unaligned_weights(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 24))
    for layer in net:
        w = layer.weight.detach()
        buffer = torch.empty(w.numel() + 16)
        view = buffer[3:3 + w.numel()].view_as(w)  # 12 bytes past an aligned start: as a weight mapped from a file
        view.copy_(w)
        layer.weight.data = view
        assert layer.weight.data_ptr() % 64
    model = lp.adapt(net, lp.LoraConfig(r=3, alpha=5, target_modules=["0", "1"]), "a")
    model.add_adapter("b", lp.LavaConfig(r=2, alpha=3.3, target_modules=["0", "1"]))
    randomize_adapters(model, std=0.3)
    return model


def _weights(model):
    return [layer.base_weight.detach().clone() for layer in (model.model[0], model.model[1])]


def test_merge_and_switch_on_unaligned_weights_equal_the_aligned_computation():
    model = _model_with_unaligned_weights()
    aligned = _model_with_unaligned_weights()
    for layer in (aligned.model[0], aligned.model[1]):
        layer.base_weight.data = layer.base_weight.data.clone()  # the same values, aligned storage
        assert layer.base_weight.data_ptr() % 64 == 0
    w0 = _weights(model)
    x = torch.randn(5, 24)
    with torch.no_grad():
        for m in (model, aligned):
            m.set_adapter("a")
            m.merge_adapter()
            m.set_adapter("b")  # one in-place GEMM per layer: W + [s_b B_b | -s_a B_a][A_b; A_a]
        for layer in (model.model[0], model.model[1]):
            assert layer.base_weight.data_ptr() % 64 == 0  # moved once to aligned storage
        for got, ref in zip(_weights(model), _weights(aligned)):
            assert torch.equal(got, ref)
        # independent computation: W0 + ΔW_b
        for k, layer in enumerate((model.model[0], model.model[1])):
            expected = w0[k] + layer.adapters["b"].delta_weight()
            torch.testing.assert_close(layer.base_weight, expected, rtol=1e-5, atol=1e-6)
        merged_out = model(x)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), merged_out, rtol=1e-5, atol=1e-5)  # unmerged adapter b, same output
        for got, ref in zip(_weights(model), w0):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_a_non_finite_adapter_is_named_and_nothing_changes():
    model = _model_with_unaligned_weights(1)
    with torch.no_grad():
        model.model[1].adapters["b"].lava_U[0, 0] = float("nan")
        model.set_adapter("a")
        model.merge_adapter()
        before = _weights(model)
        with pytest.raises(lp.LavaError, match="'b' has non-finite"):
            model.set_adapter("b")
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))
    assert model.model[0].merged_adapters == ["a"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_agrees_with_isfinite(bad):
    t = torch.randn(7, 5)
    assert all_finite(t) and all_finite(torch.empty(0))
    t[3, 2] = bad
    assert not all_finite(t) and not bool(torch.isfinite(t).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_switch_gemm_operands_are_bitwise_the_scaled_factors(dtype):
    """remerge builds ``[−s_a B_a | s_b B_b]`` by one multiply with a column-scale vector: the same numbers as
    folding each scale into its factor (``_fused_factors``), so the switched weight is bit for bit the same."""
    model = _model_with_unaligned_weights(2)
    model.model.to(dtype)
    with torch.no_grad():
        model.set_adapter("a")
        model.merge_adapter()
        expected = []
        for layer in (model.model[0], model.model[1]):
            fb, fa = layer._fused_factors("b"), layer._fused_factors("a")
            up, down = torch.cat([-fa[0], fb[0]], dim=1), torch.cat([fa[1], fb[1]], dim=0)  # remerge's order
            expected.append(layer.base_weight.detach().clone().addmm_(up, down))
        model.set_adapter("b")
    assert model.model[0].adapters["b"].scale != 1.0 and model.model[0].base_weight.dtype == dtype
    for got, ref in zip(_weights(model), expected):
        assert torch.equal(got, ref)
