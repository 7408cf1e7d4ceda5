"""Every fast path equals its reference path (forward and gradients).

Tolerances: fp32 — ``atol=rtol=1e-5`` (the paths differ only in summation order);
bf16 (autocast or bf16 weights) — compared with the fp32 reference at
``atol=rtol=3e-2`` (bf16 has an 8-bit mantissa: ~4e-3 relative per rounding, and a few
roundings accumulate along each path).
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lava_peft as lp
from lava_peft.layers import AdaptedLayer
from lava_peft.methods.base import lowrank_forward
from lava_peft.methods.cp_conv import (
    DEVICE_PROFILES,
    choose_conv_path,
    conv_output_spatial,
    conv_path_costs,
    cp_conv_separable,
)
from lava_peft.methods.lava import batched_orth_penalty, orth_penalty

FP32 = dict(atol=1e-5, rtol=1e-5)
BF16 = dict(atol=3e-2, rtol=3e-2)


def _randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _grads(params):
    return [p.grad.detach().clone() for p in params]


# =========================================================================== Linear
def _linear_reference(layer: AdaptedLayer, x: torch.Tensor, names) -> torch.Tensor:
    """Independent computation: one F.linear with ``W0 + Σ s·U V`` (ΔW materialised)."""
    w = layer.base_layer.weight
    for n in names:
        a = layer.adapters[n]
        up, down = (a.lava_U, a.lava_V) if hasattr(a, "lava_U") else (a.lora_B, a.lora_A)
        w = w + a.scale * up @ down
    return F.linear(x, w, layer.base_layer.bias)


@pytest.mark.parametrize("method", ["lava", "lora"])
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12)])
def test_linear_fast_path_equals_materialized_reference(method, shape):
    torch.manual_seed(0)
    cfg = (lp.LavaConfig if method == "lava" else lp.LoraConfig)(r=4, alpha=8, target_modules=["lin"])
    model = lp.adapt(nn.ModuleDict({"lin": nn.Linear(12, 7)}), cfg)
    _randomize(model)
    layer = model.model["lin"]
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    out.pow(2).sum().backward()
    g_fast, gx_fast = _grads(params), x.grad.clone()
    for p in params:
        p.grad = None
    x.grad = None
    ref = _linear_reference(layer, x, ["default"])
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref, **FP32)
    torch.testing.assert_close(gx_fast, x.grad, **FP32)
    for a, b in zip(g_fast, _grads(params)):
        torch.testing.assert_close(a, b, **FP32)


def _grad_fn_names(t: torch.Tensor) -> set[str]:
    """Names of every autograd node reachable from ``t``."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(nxt for nxt, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12), (12,)])
def test_fused_lowrank_linear_node_equals_composed_reference_path(bias, shape):
    """The one-node path (fused_linear) against lowrank_forward composed from autograd ops."""
    from lava_peft.fused_linear import lowrank_linear

    torch.manual_seed(0)
    lin = nn.Linear(12, 7, bias=bias).requires_grad_(False)
    down = torch.randn(3, 12, requires_grad=True)
    up = torch.randn(7, 3, requires_grad=True)
    adapter = lp.adapt(nn.ModuleDict({"lin": nn.Linear(12, 7)}), lp.LoraConfig(r=3, target_modules=["lin"]))
    adapter = adapter.model["lin"].adapters["default"]  # only its spec / dropout are read
    results = []
    for fused in (True, False):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
        if fused:
            y = lowrank_linear(x, lin.weight, lin.bias, down, up, 1.5)
            assert "_LowRankLinearBackward" in _grad_fn_names(y)
        else:
            y = lowrank_forward(x, down, up, 1.5, adapter, x.dtype, lin(x))
        (y * torch.arange(y.numel()).view(y.shape)).sum().backward()
        results.append((y.detach(), x.grad, down.grad.clone(), up.grad.clone()))
        down.grad = up.grad = None
    assert results[0][0].shape == (*shape[:-1], 7)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **FP32)


def test_fused_lowrank_linear_passes_gradcheck_in_float64():
    from lava_peft.fused_linear import lowrank_linear

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    down = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, d, u: lowrank_linear(x, w, b, d, u, 0.7), (x, down, up))


def _one_linear_model(method="lava", **cfg):
    config = (lp.LavaConfig if method == "lava" else lp.LoraConfig)(r=4, alpha=8, target_modules=["lin"], **cfg)
    model = lp.adapt(nn.ModuleDict({"lin": nn.Linear(12, 7)}), config)
    _randomize(model)
    return model, model.model["lin"]


@pytest.mark.parametrize("method", ["lava", "lora"])
def test_adapted_linear_runs_as_one_fused_node_by_default(method):
    _, layer = _one_linear_model(method)
    y = layer(torch.randn(4, 12, requires_grad=True))
    names = _grad_fn_names(y)
    assert "_LowRankLinearBackward" in names
    assert "AddmmBackward0" not in names  # the base op is inside the fused node


@pytest.mark.parametrize("case", ["base_trainable", "forward_hook", "autocast", "dropout"])
def test_cases_the_fused_node_cannot_serve_take_the_reference_path(case):
    """Each of these keeps the composed path, and the result still equals the independent reference."""
    _, layer = _one_linear_model(dropout=0.5 if case == "dropout" else 0.0)
    x = torch.randn(4, 12)
    if case == "base_trainable":
        layer.base_layer.weight.requires_grad_(True)
    if case == "forward_hook":
        calls = []
        layer.base_layer.register_forward_hook(lambda *a: calls.append(1))
    if case == "dropout":
        torch.manual_seed(3)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if case == "autocast" else contextlib.nullcontext()
    with ctx:
        y = layer(x)
    assert "_LowRankLinearBackward" not in _grad_fn_names(y)
    if case == "forward_hook":
        assert calls == [1]
    if case in ("base_trainable", "forward_hook"):
        torch.testing.assert_close(y, _linear_reference(layer, x, ["default"]), **FP32)
    if case == "base_trainable":
        y.sum().backward()
        assert layer.base_layer.weight.grad is not None


def test_lava_lambda0_with_lora_factors_is_bit_identical_to_lora_fast_path():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    lora = lp.adapt(copy.deepcopy(base), lp.LoraConfig(r=4, alpha=8, target_modules=["0", "2"]))
    lava = lp.adapt(copy.deepcopy(base), lp.LavaConfig(r=4, alpha=8, target_modules=["0", "2"], orth_lambda=0.0))
    _randomize(lora)
    with torch.no_grad():
        for i in ("0", "2"):
            la, lv = lora.model[int(i)].adapters["default"], lava.model[int(i)].adapters["default"]
            lv.lava_U.copy_(la.lora_B)
            lv.lava_V.copy_(la.lora_A)
    x = torch.randn(3, 5, 16)
    outs, grads = [], []
    for m in (lora, lava):
        y = m(x)
        (y.pow(2).sum() + m.regularization_loss()).backward()
        outs.append(y)
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    assert torch.equal(outs[0], outs[1])
    # LoRA params are (A, B) per layer, LAVA (U, V): compare by role
    for i in (0, 2):
        la, lv = lora.model[i].adapters["default"], lava.model[i].adapters["default"]
        assert torch.equal(la.lora_A.grad, lv.lava_V.grad)
        assert torch.equal(la.lora_B.grad, lv.lava_U.grad)


def test_linear_fast_path_bf16_weights_close_to_fp32_reference():
    torch.manual_seed(0)
    model = lp.adapt(nn.ModuleDict({"lin": nn.Linear(32, 16)}), lp.LavaConfig(r=4, target_modules=["lin"]))
    _randomize(model)
    ref_layer = copy.deepcopy(model.model["lin"])
    model.model["lin"].base_layer.to(torch.bfloat16)
    layer = model.model["lin"]
    assert layer.adapters["default"].lava_U.dtype == torch.float32  # factors stay fp32
    x = torch.randn(4, 32)
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _linear_reference(ref_layer, x, ["default"]), **BF16)
    out.float().sum().backward()
    assert layer.adapters["default"].lava_U.grad.dtype == torch.float32


def test_linear_fast_path_under_cpu_autocast_bf16():
    torch.manual_seed(0)
    model = lp.adapt(nn.ModuleDict({"lin": nn.Linear(32, 16)}), lp.LavaConfig(r=4, target_modules=["lin"]))
    _randomize(model)
    layer = model.model["lin"]
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _linear_reference(layer, x, ["default"]).detach(), **BF16)


def test_lowrank_forward_noncontiguous_base_out_and_contribution_only():
    torch.manual_seed(0)
    model = lp.adapt(nn.ModuleDict({"lin": nn.Linear(6, 5)}), lp.LoraConfig(r=2, target_modules=["lin"]))
    _randomize(model)
    a = model.model["lin"].adapters["default"]
    x = torch.randn(4, 6)
    contrib = a.scale * (x @ a.lora_A.T) @ a.lora_B.T
    torch.testing.assert_close(lowrank_forward(x, a.lora_A, a.lora_B, a.scale, a, x.dtype), contrib, **FP32)
    base = torch.randn(5, 4).T  # non-contiguous 2-D: accumulated in place
    expected = base + contrib
    out = lowrank_forward(x, a.lora_A, a.lora_B, a.scale, a, x.dtype, base)
    torch.testing.assert_close(out, expected, **FP32)
    x3, base3 = torch.randn(2, 4, 6), torch.randn(2, 4, 5)  # N-d: out of place, base untouched
    before = base3.clone()
    out3 = lowrank_forward(x3, a.lora_A, a.lora_B, a.scale, a, x.dtype, base3)
    torch.testing.assert_close(out3, before + a.scale * (x3 @ a.lora_A.T) @ a.lora_B.T, **FP32)
    assert torch.equal(base3, before)


def test_linear_dropout_path_equals_reference_and_eval_skips_dropout():
    torch.manual_seed(0)
    model = lp.adapt(nn.ModuleDict({"lin": nn.Linear(10, 6)}),
                     lp.LavaConfig(r=3, target_modules=["lin"], dropout=0.5))
    _randomize(model)
    layer = model.model["lin"]
    a = layer.adapters["default"]
    x = torch.randn(8, 10)
    model.train()
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    ref = layer.base_layer(x) + a.scale * F.linear(F.linear(F.dropout(x, 0.5, True), a.lava_V), a.lava_U)
    torch.testing.assert_close(out, ref, **FP32)
    model.eval()
    torch.testing.assert_close(layer(x), _linear_reference(layer, x, ["default"]), **FP32)


def test_several_active_adapters_and_embedding_and_conv1d_gpt2():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.ModuleDict({"lin": nn.Linear(8, 6), "emb": nn.Embedding(11, 5, padding_idx=0), "c1d": Conv1D(7, 8)})
    model = lp.adapt(base, lp.LavaConfig(r=3, target_modules=["lin", "emb", "c1d"]), "a")
    model.add_adapter("b", lp.LoraConfig(r=2, target_modules=["lin", "emb", "c1d"]))
    model.set_adapter(["a", "b"])
    _randomize(model)
    x = torch.randn(4, 8)
    lin = model.model["lin"]
    torch.testing.assert_close(lin(x), _linear_reference(lin, x, ["a", "b"]), **FP32)
    emb = model.model["emb"]
    ids = torch.tensor([[0, 3, 10], [4, 4, 1]])
    w = emb.base_layer.weight + sum(emb.adapters[n].delta_weight().T for n in ("a", "b"))
    torch.testing.assert_close(emb(ids), F.embedding(ids, w, padding_idx=0), **FP32)
    c1d = model.model["c1d"]
    w = c1d.base_layer.weight + sum(c1d.adapters[n].delta_weight().T for n in ("a", "b"))
    torch.testing.assert_close(c1d(x), x @ w + c1d.base_layer.bias, **FP32)


def test_gradient_checkpointing_gives_the_same_gradients():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Conv1d(4, 4, 3, padding=1))
    model = lp.adapt(base, lp.LavaConfig(r=2, target_modules=["0", "2"], conv_path="separable"))
    _randomize(model)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(2, 4, 8, requires_grad=True)

    def run(x):
        h = model.model[1](model.model[0](x))
        return model.model[2](h)

    results = []
    for mode in ("plain", "reentrant", "non_reentrant"):
        for p in params:
            p.grad = None
        x.grad = None
        if mode == "plain":
            y = run(x)
        else:
            y = checkpoint(run, x, use_reentrant=(mode == "reentrant"))
        y.pow(2).sum().backward()
        results.append((y.detach(), x.grad.clone(), _grads(params)))
    for y, gx, gp in results[1:]:
        torch.testing.assert_close(y, results[0][0], **FP32)
        torch.testing.assert_close(gx, results[0][1], **FP32)
        for a, b in zip(gp, results[0][2]):
            torch.testing.assert_close(a, b, **FP32)


# =========================================================================== Conv
CONV_CASES = {
    "3x3": (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 9, 9)),
    "stride-dilation": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=2), (2, 6, 11, 10)),
    "same-reflect": (lambda: nn.Conv2d(6, 8, (3, 4), padding="same", dilation=2, padding_mode="reflect"), (2, 6, 11, 10)),
    "7x7-circular": (lambda: nn.Conv2d(6, 8, 7, stride=(2, 1), padding=3, padding_mode="circular"), (2, 6, 16, 15)),
    "1x1-stride": (lambda: nn.Conv2d(6, 8, 1, stride=2, bias=False), (2, 6, 9, 9)),
    "groups": (lambda: nn.Conv2d(6, 9, 3, groups=3, padding=1), (2, 6, 9, 9)),
    "valid": (lambda: nn.Conv2d(6, 8, 3, padding="valid"), (2, 6, 9, 9)),
    "conv1d": (lambda: nn.Conv1d(6, 8, 5, padding=2, stride=2), (2, 6, 17)),
    "conv3d-replicate": (lambda: nn.Conv3d(4, 6, (3, 1, 2), padding=(1, 0, 1), stride=(1, 2, 1),
                                           padding_mode="replicate"), (2, 4, 5, 6, 7)),
}


def _conv_model(make, path, orth_factors="out", dropout=0.0):
    torch.manual_seed(0)
    conv = make()
    model = lp.adapt(nn.ModuleDict({"conv": conv}),
                     lp.LavaConfig(r=3, alpha=6, target_modules=["conv"], conv_path=path, orth_factors=orth_factors,
                                   dropout=dropout))
    _randomize(model)
    return model


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("channels_last", [False, True])
def test_separable_conv_chain_equals_weight_path(case, channels_last):
    make, shape = CONV_CASES[case]
    results = []
    for path in ("weight", "separable"):
        model = _conv_model(make, path)
        layer = model.model["conv"]
        torch.manual_seed(1)
        x = torch.randn(*shape)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        a = layer.adapters["default"]
        assert a.uses_weight_path_for(x, layer) == (path == "weight")
        y = layer(x)
        y.pow(2).sum().backward()
        results.append((y.detach(), x.grad, [p.grad for p in (a.lava_U, a.lava_V, *a.lava_P)]))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    torch.testing.assert_close(y1, y0, **FP32)
    torch.testing.assert_close(gx1, gx0, **FP32)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)  # sums over all pixels


def test_separable_conv_equals_independent_delta_conv():
    """Against ``conv(x, W0) + conv(x, ΔW)`` with ΔW from the explicit CP einsum."""
    model = _conv_model(CONV_CASES["stride-dilation"][0], "separable")
    layer = model.model["conv"]
    a = layer.adapters["default"]
    delta = torch.einsum("oj,ji,ja,jb->oiab", a.lava_U, a.lava_V, *a.lava_P) * a.scale
    x = torch.randn(2, 6, 11, 10)
    c = layer.base_layer
    ref = F.conv2d(x, c.weight + delta, c.bias, c.stride, c.padding, c.dilation)
    torch.testing.assert_close(layer(x), ref, **FP32)
    contrib = cp_conv_separable(x, a.lava_U, a.lava_V, list(a.lava_P), a.scale, c, x.dtype)
    torch.testing.assert_close(contrib, F.conv2d(x, delta, None, c.stride, c.padding, c.dilation), **FP32)


def test_separable_conv_with_dropout_equals_reference():
    model = _conv_model(CONV_CASES["3x3"][0], "auto", dropout=0.3)
    layer = model.model["conv"]
    a = layer.adapters["default"]
    x = torch.randn(2, 6, 9, 9)
    model.train()
    assert not a.uses_weight_path_for(x, layer)  # dropout forces the chain
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.3, True)
    ref = layer.base_layer(x) + F.conv2d(xd, a.delta_weight(), None, 1, 1)
    torch.testing.assert_close(y, ref, **FP32)


@pytest.mark.parametrize("path", ["weight", "separable"])
def test_conv_paths_under_cpu_autocast_bf16(path):
    make, shape = CONV_CASES["3x3"]
    model = _conv_model(make, path)
    layer = model.model["conv"]
    x = torch.randn(*shape).contiguous(memory_format=torch.channels_last)
    ref = layer.base_layer(x) + F.conv2d(x, layer.adapters["default"].delta_weight(), None, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.detach(), **BF16)
    y.float().sum().backward()
    assert layer.adapters["default"].lava_U.grad.dtype == torch.float32


def test_auto_conv_path_choice_is_deterministic_and_pinned():
    torch.manual_seed(0)
    resnet_like = [
        # ResNet-50 layers at batch 64, r=8: (conv, input size) -> choice on cuda (bf16), cpu (fp32).
        # On the GPU the chain's activation traffic usually costs more than the weight path's
        # extra weight-gradient GEMM; on a 2-core CPU the GEMM is the expensive part.
        (nn.Conv2d(3, 64, 7, 2, 3, bias=False), 224, "weight", "weight"),
        (nn.Conv2d(64, 64, 3, 1, 1, bias=False), 56, "weight", "separable"),
        (nn.Conv2d(256, 256, 3, 1, 1, bias=False), 14, "separable", "separable"),
        (nn.Conv2d(256, 64, 1, bias=False), 56, "weight", "weight"),
        (nn.Conv2d(1024, 2048, 1, 2, bias=False), 14, "weight", "separable"),
        (nn.Conv2d(64, 64, 3, 1, 1, groups=64, bias=False), 56, "weight", "weight"),
    ]
    for conv, size, want_cuda, want_cpu in resnet_like:
        shape = (64, conv.in_channels, size, size)
        got_cuda = choose_conv_path(conv, shape, 8, torch.bfloat16, "cuda")
        got_cpu = choose_conv_path(conv, shape, 8, torch.float32, "cpu")
        assert (got_cuda, got_cpu) == (want_cuda, want_cpu), (conv, got_cuda, got_cpu)
        # deterministic: same answer for a fresh layer of the same shape, and again
        twin = copy.deepcopy(conv)
        assert choose_conv_path(twin, shape, 8, torch.bfloat16, "cuda") == got_cuda
        assert choose_conv_path(conv, shape, 8, torch.float32, "cpu") == got_cpu
    assert set(DEVICE_PROFILES) == {"cuda", "cpu"}


def test_conv_cost_model_formulas():
    assert conv_output_spatial((9, 10), (3, 3), (2, 2), (1, 1), (2, 2)) == (4, 4)
    assert conv_output_spatial((9, 10), (3, 3), 1, "valid", 1) == (7, 8)
    assert conv_output_spatial((9, 10), (3, 4), 1, "same", 2) == (9, 10)
    costs = conv_path_costs(1, (4, 4), (4, 4), 8, 8, (3, 3), 1, 2, 4, "cpu")
    macs, bw = DEVICE_PROFILES["cpu"]
    weight = (16 * 8 * 8 * 9) / macs + 4 * (16 * 8 + 16 * 8) / bw
    assert math.isclose(costs["weight"], weight)
    sep = 3 * 2 * (16 * 8 + 16 * 9 + 16 * 8) / macs + 4 * (5 * 16 * 8 + 4 * 16 * 8 + 6 * 2 * 32) / bw
    assert math.isclose(costs["separable"], sep)


def test_conv_path_config_validation_and_round_trip():
    with pytest.raises(lp.LavaConfigError, match="conv_path"):
        lp.LavaConfig(r=2, target_modules=["c"], conv_path="fast")
    cfg = lp.LavaConfig(r=2, target_modules=["c"], conv_path="separable")
    assert lp.LavaConfig.from_dict(cfg.to_dict()).conv_path == "separable"
    assert lp.LavaConfig(r=2, target_modules=["c"]).conv_path == "auto"


def test_weight_path_is_one_conv_when_auto_says_weight(monkeypatch):
    model = _conv_model(CONV_CASES["groups"][0], "auto")  # grouped conv: the cost model says "weight"
    layer = model.model["conv"]
    a = layer.adapters["default"]
    x = torch.randn(2, 6, 9, 9)
    assert a.conv_path_for(x, layer) == "weight"
    calls = []
    monkeypatch.setattr(type(a), "forward", lambda *args, **kw: calls.append(1))
    layer(x)
    assert calls == []  # the adapter's own (separate) forward was not needed


# =========================================================================== orthogonality term
def test_batched_orth_term_equals_per_layer_computation():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 20), nn.Linear(20, 6),
                         nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, (1, 5)))
    for factors in ("out", "in", "all"):
        model = lp.adapt(copy.deepcopy(base), lp.LavaConfig(r=4, target_modules=["0", "1", "2", "3", "4", "5"],
                                                            orth_factors=factors, orth_lambda=0.3))
        _randomize(model)
        adapters = [a for _, a in model.adapter_layers("default")]
        ref = 0.3 * torch.stack([a.regularization() for a in adapters]).mean()
        ref.backward()
        g_ref = [None if p.grad is None else p.grad.clone() for p in model.parameters() if p.requires_grad]
        for p in model.parameters():
            p.grad = None
        got = model.regularization_loss()
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
        got.backward()
        for a, b in zip([p.grad for p in model.parameters() if p.requires_grad], g_ref):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_batched_orth_penalty_groups_by_shape_and_handles_wide_factors():
    torch.manual_seed(0)
    fs = [torch.randn(10, 3), torch.randn(10, 3), torch.randn(2, 5), torch.randn(7, 3)]
    torch.testing.assert_close(batched_orth_penalty(fs), sum(orth_penalty(f) for f in fs), **FP32)
    assert batched_orth_penalty([torch.randn(4, 2, dtype=torch.bfloat16)]).dtype == torch.float32


# =========================================================================== torch.compile
def test_adapted_linear_and_conv_trace_without_graph_breaks():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 18), nn.Unflatten(1, (2, 3, 3)), nn.Conv2d(2, 4, 3, padding=1))
    for path in ("auto", "separable", "weight"):
        model = lp.adapt(copy.deepcopy(base), lp.LavaConfig(r=2, target_modules=["0", "2"], conv_path=path))
        _randomize(model)
        x = torch.randn(3, 8)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, (path, explanation.break_reasons)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        y = compiled(x)
        y.sum().backward()
        torch.testing.assert_close(y, model(x), **FP32)


# =========================================================================== quantized base
@pytest.mark.parametrize("scheme", ["torchao-int8", "bnb-4bit"])
def test_quantized_base_runs_factored_path(scheme):
    from lava_peft.quant import available_schemes, is_quantized_linear, quantize_linears

    if scheme not in available_schemes():
        pytest.fail(f"{scheme} backend missing: it is a dev dependency, `make venv` installs it "
                    "(pip install torchao==0.18.0 bitsandbytes==0.50.2)")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).to(torch.bfloat16)
    assert quantize_linears(base, scheme) == 2
    assert is_quantized_linear(base[0])
    model = lp.adapt(base, lp.LavaConfig(r=4, target_modules=["0", "2"]))
    _randomize(model)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    layer = model.model[0]
    a = layer.adapters["default"]
    base_out = layer.base_layer(x)
    y = layer(x)
    ref = base_out.float() + a.scale * (x.float() @ a.lava_V.T) @ a.lava_U.T
    # bf16 tolerance relative to the output's magnitude (the adapter term is large here)
    torch.testing.assert_close(y.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=3e-2)
    model(x).float().sum().backward()
    assert a.lava_U.grad is not None and a.lava_U.grad.dtype == torch.float32


def test_quantize_linears_errors():
    from lava_peft.quant import quantize_linears

    with pytest.raises(lp.LavaError, match="unknown quantization scheme"):
        quantize_linears(nn.Sequential(nn.Linear(2, 2)), "int3")
    with pytest.raises(lp.LavaError, match="no nn.Linear matches"):
        quantize_linears(nn.Sequential(nn.Linear(2, 2)), "torchao-int8", targets=["nope"])


def test_merging_into_a_quantized_base_is_refused_and_changes_nothing():
    from lava_peft.quant import quantize_linears

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).to(torch.bfloat16)
    quantize_linears(base, "torchao-int8", targets=["2"])
    model = lp.adapt(base, lp.LavaConfig(r=4, target_modules=["0", "2"]))
    _randomize(model)
    before = model.model[0].base_layer.weight.detach().clone()
    with pytest.raises(lp.LavaError, match="2 has a quantized base weight"):
        model.merge_adapter()
    assert model.merged_adapters == []
    assert torch.equal(model.model[0].base_layer.weight, before)  # layer 0 (not quantized) untouched too


# =========================================================================== sparse Linear node
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 12), (2, 3, 12)])
def test_fused_sparse_node_equals_composed_weight_path(bias, shape):
    """SHiRA on a Linear: one node with a sampled weight gradient == F.linear(x, W + ΔW) by autograd."""
    torch.manual_seed(0)
    model = lp.adapt(nn.ModuleDict({"lin": nn.Linear(12, 9, bias=bias)}), lp.ShiraConfig(r=2, alpha=0.7, target_modules=["lin"]))
    _randomize(model)
    layer = model.model["lin"]
    adapter = layer.adapters["default"]
    results = []
    for fused in (True, False):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
        if fused:
            y = layer(x)
            assert "_SparseDeltaLinearBackward" in _grad_fn_names(y)
        else:  # independent: dense ΔW from the indices by hand
            delta = torch.zeros(9 * 12).index_put((adapter.sparse_indices.long(),), adapter.sparse_values * 0.7)
            y = F.linear(x, layer.base_layer.weight + delta.view(9, 12), layer.base_layer.bias)
        (y * torch.arange(y.numel()).view(y.shape)).sum().backward()
        results.append((y.detach(), x.grad, adapter.sparse_values.grad.clone()))
        adapter.sparse_values.grad = None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **FP32)


def test_fused_sparse_node_gradcheck_and_pattern_follows_new_indices(tmp_path):
    from lava_peft.fused_sparse import csr_pattern, sparse_delta_linear

    torch.manual_seed(0)
    w, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    idx = torch.tensor([0, 4, 7, 8, 13, 29], dtype=torch.int32)
    crow, cols = csr_pattern(idx, 5, 6)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v: sparse_delta_linear(x, w, b, v, idx, crow, cols, 0.5), (x, v))
    # the cached CSR pattern follows an index buffer replaced in place (load / hot-swap)
    net = lambda: nn.Sequential(nn.Linear(6, 5))  # noqa: E731
    torch.manual_seed(1)
    pristine = net()
    a = lp.adapt(copy.deepcopy(pristine), lp.ShiraConfig(r=1, target_modules=["0"], seed=1))
    b2 = lp.adapt(copy.deepcopy(pristine), lp.ShiraConfig(r=1, target_modules=["0"], seed=2))
    for m in (a, b2):
        _randomize(m)
    xs = torch.randn(4, 6)
    a(xs)  # builds and caches a's pattern
    before = a.adapter_layers()[0][1].sparse_indices.clone()
    assert not torch.equal(before, b2.adapter_layers()[0][1].sparse_indices)  # different masks
    b2.save_pretrained(str(tmp_path))
    from lava_peft.hotswap import hotswap_adapter

    hotswap_adapter(a, str(tmp_path))
    y = a(xs)
    torch.testing.assert_close(y, b2(xs), **FP32)
    y.sum().backward()  # the backward's sampled gradient uses the new pattern as well
    ref = b2(xs)
    ref.sum().backward()
    torch.testing.assert_close(a.adapter_layers()[0][1].sparse_values.grad, b2.adapter_layers()[0][1].sparse_values.grad,
                               **FP32)


@pytest.mark.parametrize("case", ["bf16", "dropout", "autocast"])
def test_sparse_adapter_cases_outside_the_node_take_the_weight_path(case):
    torch.manual_seed(0)
    model = lp.adapt(nn.ModuleDict({"lin": nn.Linear(12, 9)}),
                     lp.ShiraConfig(r=2, target_modules=["lin"], dropout=0.3 if case == "dropout" else 0.0))
    _randomize(model)
    layer = model.model["lin"]
    x = torch.randn(4, 12)
    if case == "bf16":
        layer.base_layer.to(torch.bfloat16)
        x = x.bfloat16()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if case == "autocast" else contextlib.nullcontext()
    with ctx:
        y = layer(x)
    assert "_SparseDeltaLinearBackward" not in _grad_fn_names(y)
