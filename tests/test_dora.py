"""DoRA (use_dora=True) on LoRA and LAVA: equal to the real peft 0.21's DoRA, and to m·(W0+ΔW)/‖W0+ΔW‖_c."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lava_peft as lp
from lava_peft.methods.dora import dora_column_norm
from _tiny_models import randomize_adapters

TARGETS = ["fc", "conv", "emb", "proj"]
IDS = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(1))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 8)
        self.proj = Conv1D(8, 8)
        self.conv = nn.Conv2d(2, 5, 3, padding=1)

    def forward(self, ids):
        h = self.proj(torch.relu(self.fc(self.emb(ids))))
        return self.conv(h.reshape(h.shape[0], 2, 4, 4)).flatten(1)


def _net():
    torch.manual_seed(0)
    return _Net().eval()


def _peft_dora(tmp_path, dropout=0.0):
    torch.manual_seed(1)
    theirs = peft.get_peft_model(_net(), peft.LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, use_dora=True,
                                                         init_lora_weights=False, lora_dropout=dropout))
    with torch.no_grad():  # every tensor random, the magnitudes away from ‖W0 + ΔW‖
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.3)
    theirs.save_pretrained(str(tmp_path / "peft"))
    return theirs.eval()


def test_import_equals_peft_dora_outputs_and_gradients_then_exports_back(tmp_path):
    theirs = _peft_dora(tmp_path)
    ours = lp.import_peft(_net(), str(tmp_path / "peft"), is_trainable=True).eval()
    assert ours.peft_config["default"].use_dora
    torch.testing.assert_close(ours(IDS), theirs(IDS), rtol=1e-5, atol=1e-5)
    # the same gradients (PEFT detaches the norm, so do we): magnitude, A and B of every layer
    ours(IDS).pow(2).sum().backward()
    theirs(IDS).pow(2).sum().backward()
    for path in TARGETS:
        mine = ours.model.get_submodule(path).adapters["default"]
        layer = theirs.base_model.model.get_submodule(path)
        emb = path == "emb"
        a = layer.lora_embedding_A["default"] if emb else layer.lora_A["default"].weight
        b = layer.lora_embedding_B["default"] if emb else layer.lora_B["default"].weight
        mag = layer.lora_magnitude_vector["default"].weight
        torch.testing.assert_close(mine.dora_magnitude.grad, mag.grad.reshape(-1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.lora_A.grad, a.grad.reshape(a.shape[0], -1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.lora_B.grad, b.grad.reshape(b.shape[0], -1), rtol=1e-4, atol=1e-5)
    # merge / unmerge match the unmerged outputs; export is read back by PEFT
    with torch.no_grad():
        before = ours(IDS)
        ours.merge_adapter()
        torch.testing.assert_close(ours(IDS), before, rtol=1e-5, atol=1e-5)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours(IDS), before, rtol=1e-5, atol=1e-5)
    lp.export_peft(ours, str(tmp_path / "back"))
    back = peft.PeftModel.from_pretrained(_net(), str(tmp_path / "back")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), before, rtol=1e-5, atol=1e-5)


def test_dropout_is_applied_like_peft(tmp_path):
    """With dropout active PEFT rescales W0·dropout(x) too; same mask ⇒ same output."""
    theirs = _peft_dora(tmp_path, dropout=0.3)
    ours = lp.import_peft(_net(), str(tmp_path / "peft"), is_trainable=True)
    ours.train(), theirs.train()
    torch.manual_seed(5)
    mine = ours(IDS)
    torch.manual_seed(5)
    torch.testing.assert_close(mine, theirs(IDS), rtol=1e-5, atol=1e-5)


def _dora_reference_weight(w0, delta, m):
    """m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖_c, the norm over every dim but the output channel (float64)."""
    v = (w0 + delta).double()
    norm = v.reshape(v.shape[0], -1).norm(dim=1)
    return (m.double() / norm).view(-1, *([1] * (v.dim() - 1))) * v


@pytest.mark.parametrize("kind", ["linear", "conv_cp", "conv1d_cp"])
def test_lava_dora_is_the_magnitude_times_the_normalised_direction(kind):
    torch.manual_seed(0)
    base, x = {
        "linear": (nn.Linear(7, 5), torch.randn(4, 7)),
        "conv_cp": (nn.Conv2d(3, 6, 3, padding=1, stride=2), torch.randn(2, 3, 8, 8)),
        "conv1d_cp": (nn.Conv1d(4, 5, 3, dilation=2), torch.randn(2, 4, 12)),
    }[kind]
    model = lp.adapt(nn.Sequential(base), lp.LavaConfig(r=2, alpha=3, target_modules=["0"], use_dora=True))
    adapter = model.model[0].adapters["default"]
    w0 = model.model[0].base_layer.weight.detach().clone()
    # at init m = ‖W0‖_c and the output is the base output
    torch.testing.assert_close(adapter.dora_magnitude.detach(), w0.reshape(w0.shape[0], -1).norm(dim=1))
    randomize_adapters(model, 2)
    if kind != "linear":
        assert len(adapter.lava_P) == len(w0.shape) - 2  # the direction's increment is a CP sum
    ref_w = _dora_reference_weight(w0, adapter.delta_weight().detach(), adapter.dora_magnitude.detach()).float()
    bias = model.model[0].base_layer.bias
    with torch.no_grad():
        if kind == "linear":
            ref = F.linear(x, ref_w, bias)
        else:
            conv = model.model[0].base_layer
            ref = conv._conv_forward(x, ref_w, bias)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(adapter.effective_delta(w0) + w0, ref_w, rtol=1e-5, atol=1e-6)
        model.merge_adapter()
        torch.testing.assert_close(model.model[0].base_layer.weight, ref_w, rtol=1e-5, atol=1e-6)
        model.unmerge_adapter()
    torch.testing.assert_close(model.model[0].base_layer.weight, w0, rtol=0, atol=1e-6)


def test_column_norm_never_forms_w0_plus_delta_and_equals_the_direct_norm():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(9, 4, 3, 3, generator=gen)
    up, down = torch.randn(9, 3, generator=gen), torch.randn(3, 36, generator=gen)
    direct = (w.reshape(9, -1).double() + up.double() @ down.double()).norm(dim=1)
    torch.testing.assert_close(dora_column_norm(w, up, down).double(), direct, rtol=1e-5, atol=1e-6)
    # the canonical view of a transposed layout (GPT-2 Conv1D / Embedding) works without a copy
    wt = torch.randn(36, 9, generator=gen)
    torch.testing.assert_close(dora_column_norm(wt.T, up, down).double(),
                               (wt.T.double() + up.double() @ down.double()).norm(dim=1), rtol=1e-5, atol=1e-6)


def test_mixed_batch_rows_equal_single_adapter_runs_and_combination_refuses_dora():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    model = lp.adapt(net, lp.LavaConfig(r=2, target_modules=["0", "2"], use_dora=True), "d")
    model.add_adapter("l", lp.LoraConfig(r=2, target_modules=["0", "2"], use_dora=True))
    model.add_adapter("p", lp.LoraConfig(r=2, target_modules=["0", "2"]))
    randomize_adapters(model, 1)
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    names = ["d", "__base__", "l", "p"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    single = model(x[i:i + 1])
            else:
                model.set_adapter(name)
                single = model(x[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], single, rtol=1e-5, atol=1e-5)
    with pytest.raises(lp.LavaConfigError, match="DoRA"):
        model.add_weighted_adapter(["d", "p"], [1, 1], "x")
    assert "x" not in model.peft_config
