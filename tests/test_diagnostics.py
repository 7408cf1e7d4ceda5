"""Diagnostics: sizes, ΔW spectra under unfoldings, AWOM/AWOR, % of base weights changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lava_peft as lp
from lava_peft import diagnostics as dg
from _tiny_models import randomize_adapters


def _conv_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(6, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5), nn.Linear(5, 3))
    model = lp.adapt(net, lp.LavaConfig(r=2, target_modules=["0", "2"]), "cp")
    model.add_adapter("lora", lp.LoraConfig(r=2, target_modules=["0"], modules_to_save=["3"]))
    randomize_adapters(model)
    return model


def test_adapter_sizes_count_parameters_and_stored_bytes():
    model = _conv_model()
    sizes = dg.adapter_sizes(model)
    cp = 2 * (8 + 6 + 3 + 3) + 2 * (5 + 128)  # r(O + I + K1 + K2) + r(O + I)
    lora = 2 * (6 * 9 + 8) + (5 * 3 + 3)  # r(I·K·K + O) + the head copy
    assert sizes["cp"] == {"params": cp, "trainable_params": cp, "stored_bytes": 4 * cp, "layers": 2}
    assert sizes["lora"] == {"params": lora, "trainable_params": 0, "stored_bytes": 4 * lora, "layers": 1}


def test_spectra_show_cp_rank_in_every_unfolding_and_lora_only_in_the_flattening(tmp_path):
    model = _conv_model()
    cp = dg.delta_spectra(model, "cp")["0"]
    lora = dg.delta_spectra(model, "lora")["0"]
    assert set(cp) == {"O x I*K", "O*K1 x I*K2", "mode-0 (O)", "mode-1 (I)", "mode-2 (K1)", "mode-3 (K2)"}
    # a CP rank-2 tensor has rank <= 2 in every unfolding
    assert all(dg.numerical_rank(s) <= 2 for s in cp.values())
    # a flattened rank-2 LoRA only bounds O x I*K; its (O·K1)x(I·K2) and input-mode ranks exceed 2
    assert dg.numerical_rank(lora["O x I*K"]) == 2
    assert dg.numerical_rank(lora["O*K1 x I*K2"]) > 2 and dg.numerical_rank(lora["mode-1 (I)"]) > 2
    # values equal an independent SVD of the same unfolding
    delta = model.model[0].adapters["lora"].delta_weight().detach().double().numpy()
    ref = np.linalg.svd(delta.transpose(0, 2, 1, 3).reshape(8 * 3, 6 * 3), compute_uv=False)
    np.testing.assert_allclose(lora["O*K1 x I*K2"].numpy(), ref, rtol=1e-8, atol=1e-10)
    png = dg.plot_spectra(dg.delta_spectra(model, "cp"), str(tmp_path / "spec.png"), title="cp")
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_awom_awor_against_reference_and_for_disjoint_supports():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    awom, awor = dg.awom_awor(a, b, orientation="in")
    m = a.double().numpy().T @ b.double().numpy()
    assert awom == pytest.approx(np.linalg.norm(m, 2), rel=1e-10)
    assert awor == pytest.approx(1 - np.count_nonzero(m) / 49)
    # disjoint rows: AᵀB = 0 -> AWOM 0, AWOR 1; disjoint columns: M has one nonzero block
    top = torch.zeros(6, 4)
    top[:3] = torch.randn(3, 4, generator=gen)
    bottom = torch.zeros(6, 4)
    bottom[3:] = torch.randn(3, 4, generator=gen)
    assert dg.awom_awor(top, bottom, "in") == (0.0, 1.0)
    left = torch.zeros(6, 4)
    left[:, :2] = torch.randn(6, 2, generator=gen)
    right = torch.zeros(6, 4)
    right[:, 2:] = torch.randn(6, 2, generator=gen)
    assert dg.awom_awor(left, right, "in")[1] == pytest.approx(1 - 4 / 16)


def test_adapter_overlap_on_a_model():
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4)), lp.LoraConfig(r=2, target_modules=["0", "1"]), "a")
    model.add_adapter("b", lp.LavaConfig(r=2, target_modules=["0"]))
    randomize_adapters(model)
    res = dg.adapter_overlap(model, "a", "b")
    assert set(res["per_layer"]) == {"0"}
    d1 = model.model[0].adapters["a"].delta_weight().detach().double()
    d2 = model.model[0].adapters["b"].delta_weight().detach().double()
    assert res["awom_mean"] == pytest.approx(torch.linalg.matrix_norm(d1.T @ d2, 2).item(), rel=1e-9)  # F=6 < O=8
    assert res["awor_mean"] == pytest.approx(0.0)
    model.add_adapter("c", lp.LoraConfig(r=1, target_modules=["1"]))
    with pytest.raises(lp.LavaError, match="share no layer"):
        dg.adapter_overlap(model, "b", "c")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_change_fraction_equals_counting_after_a_real_merge(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)).to(dtype)
    model = lp.adapt(net, lp.LoraConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        model.model[0].adapters["default"].lora_B.normal_(std=1e-3)
        model.model[0].adapters["default"].lora_A[:, 8:] = 0  # half the columns untouched
    res = dg.merged_change_fraction(model)
    before = model.model[0].base_weight.detach().clone()
    model.merge_adapter()
    changed = int((model.model[0].base_weight != before).sum())
    assert res["changed"] == changed
    assert res["adapted_weights"] == 256 and res["model_params"] == 16 * 16 + 16 + 16 * 4 + 4
    assert res["percent_of_adapted"] == pytest.approx(100 * changed / 256)
    if dtype == torch.float32:
        assert changed == 128
    else:
        assert changed < 128  # bf16 swallows increments below half an ulp
    with pytest.raises(lp.LavaError, match="merged"):
        dg.merged_change_fraction(model)
