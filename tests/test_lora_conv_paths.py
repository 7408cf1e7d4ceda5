"""LoRA on convolutions: the factored path (base conv + ``A`` conv + ``s·B`` 1×1 conv) equals the
weight path (one conv with ``W0 + s·BA``) in outputs and gradients, for every conv shape the
layer supports; and ``conv_path="auto"`` chooses by LAVA's cost model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lava_peft as lp
from lava_peft.methods.cp_conv import choose_conv_path, conv_path_costs, lowrank_conv_factored

FP32 = dict(atol=1e-5, rtol=1e-5)

CASES = {
    "3x3": (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 9, 9)),
    "stride-dilation": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=2), (2, 6, 11, 10)),
    "same-reflect": (lambda: nn.Conv2d(6, 8, (3, 4), padding="same", dilation=2, padding_mode="reflect"),
                     (2, 6, 11, 10)),
    "7x7-circular": (lambda: nn.Conv2d(6, 8, 7, stride=(2, 1), padding=3, padding_mode="circular"), (2, 6, 16, 15)),
    "replicate": (lambda: nn.Conv2d(6, 8, 3, padding=2, padding_mode="replicate", bias=False), (2, 6, 8, 9)),
    "1x1-stride": (lambda: nn.Conv2d(6, 8, 1, stride=2, bias=False), (2, 6, 9, 9)),
    "valid": (lambda: nn.Conv2d(6, 8, 3, padding="valid"), (2, 6, 9, 9)),
    "groups": (lambda: nn.Conv2d(6, 9, 3, groups=3, padding=1), (2, 6, 9, 9)),
    "depthwise": (lambda: nn.Conv2d(6, 6, 3, groups=6, padding=1, stride=2), (2, 6, 9, 9)),
    "conv1d": (lambda: nn.Conv1d(6, 8, 5, padding=2, stride=2), (2, 6, 17)),
    "conv1d-grouped-same": (lambda: nn.Conv1d(4, 6, 3, padding="same", groups=2, dilation=2), (3, 4, 13)),
    "conv3d-replicate": (lambda: nn.Conv3d(4, 6, (3, 1, 2), padding=(1, 0, 1), stride=(1, 2, 1),
                                           padding_mode="replicate"), (2, 4, 5, 6, 7)),
}


def _close_fp32(got, want):
    """fp32-tight relative to the tensor's scale: the two paths sum the same products in another order
    (weight gradients sum over every pixel, so their entries reach 1e4 here)."""
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= 2e-6 * want.abs().max().item(), (err, want.abs().max().item())


def _lora_conv(make, path, r=3, dropout=0.0):
    torch.manual_seed(0)
    model = lp.adapt(nn.ModuleDict({"conv": make()}),
                     lp.LoraConfig(r=r, alpha=6, target_modules=["conv"], conv_path=path, dropout=dropout))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _run(model, x):
    layer = model.model["conv"]
    a = layer.adapters["default"]
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.pow(2).sum().backward()
    return y.detach(), x.grad, a.lora_A.grad, a.lora_B.grad


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("channels_last", [False, True])
def test_factored_equals_weight_path(case, channels_last):
    make, shape = CASES[case]
    torch.manual_seed(1)
    x = torch.randn(*shape)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    results = {}
    for path in ("weight", "factored"):
        model = _lora_conv(make, path)
        layer = model.model["conv"]
        assert layer.adapters["default"].uses_weight_path_for(x, layer) == (path == "weight")
        results[path] = _run(model, x)
    y0, gx0, ga0, gb0 = results["weight"]
    y1, gx1, ga1, gb1 = results["factored"]
    assert y0.abs().max() > 0.1 and gb0.abs().max() > 0.1  # nonzero increment and gradients
    for got, want in ((y1, y0), (gx1, gx0), (ga1, ga0), (gb1, gb0)):
        _close_fp32(got, want)


def test_factored_equals_independent_delta_conv():
    """Against ``conv(x, W0 + s·BA)`` with ``ΔW`` formed here, and the contribution alone."""
    make, shape = CASES["stride-dilation"]
    model = _lora_conv(make, "factored")
    layer = model.model["conv"]
    a, c = layer.adapters["default"], layer.base_layer
    delta = (a.lora_B @ a.lora_A).view(c.weight.shape) * (6 / 3)
    x = torch.randn(*shape)
    ref = F.conv2d(x, c.weight + delta, c.bias, c.stride, c.padding, c.dilation)
    torch.testing.assert_close(layer(x), ref, **FP32)
    contrib = lowrank_conv_factored(x, a.lora_B, a.lora_A, a.scale, c, x.dtype)
    torch.testing.assert_close(contrib, F.conv2d(x, delta, None, c.stride, c.padding, c.dilation), **FP32)


def test_factored_with_dropout_sees_the_dropped_input():
    make, shape = CASES["groups"]
    model = _lora_conv(make, "weight", dropout=0.3)  # dropout forces the factored convs even so
    layer = model.model["conv"]
    a, c = layer.adapters["default"], layer.base_layer
    x = torch.randn(*shape)
    model.train()
    assert not a.uses_weight_path_for(x, layer)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.3, True)
    ref = c(x) + F.conv2d(xd, a.delta_weight(), None, 1, 1, 1, c.groups)
    torch.testing.assert_close(y, ref, **FP32)


def test_auto_choice_uses_the_shared_cost_model_and_is_pinned():
    """``auto`` = ``choose_conv_path(..., chain="factored")``; pinned on MobileNetV2-like layers (CPU fp32,
    batch 32, 64 px input, r=8): big early convs keep the weight path, the rest factor."""
    cases = [
        (nn.Conv2d(3, 32, 3, 2, 1, bias=False), 64, "weight"),
        (nn.Conv2d(16, 96, 1, bias=False), 32, "weight"),
        (nn.Conv2d(160, 960, 1, bias=False), 2, "factored"),
        (nn.Conv2d(320, 1280, 1, bias=False), 2, "factored"),
        (nn.Conv2d(96, 96, 3, 2, 1, groups=96, bias=False), 32, "weight"),
    ]
    for conv, size, want in cases:
        shape = (32, conv.in_channels, size, size)
        got = choose_conv_path(conv, shape, 8, torch.float32, "cpu", chain="factored")
        assert got == want, (conv, got)
        model = lp.adapt(nn.ModuleDict({"c": copy.deepcopy(conv)}), lp.LoraConfig(r=8, target_modules=["c"]))
        layer = model.model["c"]
        x = torch.empty(shape)
        assert layer.adapters["default"].conv_path_for(x, layer) == want
    # LAVA's default comparison is unchanged by the new keyword
    conv = nn.Conv2d(256, 256, 3, 1, 1, bias=False)
    assert choose_conv_path(conv, (64, 256, 14, 14), 8, torch.float32, "cpu") == "separable"


def test_factored_cost_formula():
    costs = conv_path_costs(1, (4, 4), (4, 4), 8, 8, (3, 3), 1, 2, 4, "cpu")
    from lava_peft.methods.cp_conv import DEVICE_PROFILES
    macs, bw = DEVICE_PROFILES["cpu"]
    want = 3 * 2 * 16 * (8 * 9 + 8) / macs + 4 * (5 * 16 * 8 + 4 * 16 * 8 + 6 * 2 * 16) / bw
    assert abs(costs["factored"] - want) < 1e-15


def test_conv_path_validation_and_round_trip():
    with pytest.raises(lp.LavaConfigError, match="conv_path"):
        lp.LoraConfig(r=2, target_modules=["c"], conv_path="separable")
    cfg = lp.LoraConfig(r=2, target_modules=["c"], conv_path="factored")
    assert lp.LoraConfig.from_dict(cfg.to_dict()).conv_path == "factored"
    assert lp.LoraConfig(r=2, target_modules=["c"]).conv_path == "auto"


def test_mixed_batch_with_factored_conv_equals_per_sample_runs():
    make, shape = CASES["stride-dilation"]
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(make()), lp.LoraConfig(r=3, target_modules=["0"], conv_path="factored"))
    model.add_adapter("other", lp.LoraConfig(r=2, target_modules=["0"], conv_path="weight"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(4, *shape[1:])
    names = ["default", "other", "__base__", "default"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    ref = model(x[i:i + 1])
            else:
                model.set_adapter(name)
                ref = model(x[i:i + 1])
            _close_fp32(mixed[i:i + 1], ref)
