"""Fast switching: O(1) set_adapter unmerged; in-place unmerge(A)+merge(B) merged; exact restore."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lava_peft as lp
from test_contract import GPT2Conv1D
from _tiny_models import randomize_adapters


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(12, 8), nn.Linear(8, 8), GPT2Conv1D(8, 8), nn.Conv1d(8, 6, 3, padding=1))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, ids):
            h = self.net[2](self.net[1](self.net[0](ids)))
            return self.net[3](h.transpose(1, 2))

    base = Net().to(dtype)
    pristine = copy.deepcopy(base)
    model = lp.adapt(base, lp.LoraConfig(r=2, target_modules=["net.0", "net.1", "net.2", "net.3"]), "a")
    model.add_adapter("b", lp.LavaConfig(r=3, target_modules=["net.0", "net.1", "net.2", "net.3"]))
    model.add_adapter("c", lp.LoraConfig(r=1, target_modules=["net.1"]))
    randomize_adapters(model, std=0.5)
    return model.eval(), pristine


IDS = torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(0))


def _weights(model):
    return {p: layer.base_weight for p, layer in model.named_modules() if isinstance(layer, lp.AdaptedLayer)}


def test_set_adapter_unmerged_only_flips_flags():
    model, _ = _model()
    before = {p: (w.data_ptr(), w.clone()) for p, w in _weights(model).items()}
    for name in ("b", "a", "c", "b"):
        model.set_adapter(name)
    after = _weights(model)
    assert all(after[p].data_ptr() == ptr and torch.equal(after[p], w) for p, (ptr, w) in before.items())


@pytest.mark.parametrize("exact", [False, True])
def test_merged_switch_is_in_place_and_matches_unmerged_outputs(exact):
    model, pristine = _model()
    with torch.no_grad():
        reference = {}
        for name in ("a", "b", "c"):
            model.set_adapter(name)
            reference[name] = model(IDS)
        model.exact_unmerge = exact
        model.set_adapter("a")
        model.merge_adapter()
        ptrs = {p: w.data_ptr() for p, w in _weights(model).items()}
        for name in ("b", "c", "a", "b"):
            model.set_adapter(name)
            assert model.merged_adapters == [name]
            torch.testing.assert_close(model(IDS), reference[name], rtol=1e-4, atol=1e-4)
        assert {p: w.data_ptr() for p, w in _weights(model).items()} == ptrs
        model.unmerge_adapter()
    original = {n: p for n, p in pristine.named_parameters()}
    for path, w in _weights(model).items():
        ref = original[path.replace(".base_layer", "").replace("model.", "", 1) + ".weight"]
        if exact:
            assert torch.equal(w, ref), "exact_unmerge must restore the base weights bit for bit"
        else:  # subtracting ΔW again: exact up to rounding, a few ulp of |W| + |ΔW|
            torch.testing.assert_close(w, ref, rtol=0, atol=1e-6 * 50)
            assert model.model.get_submodule(path.replace("model.", "", 1))._merge_backup is None


def test_exact_unmerge_is_bit_identical_in_bf16():
    model, pristine = _model(torch.bfloat16)
    model.exact_unmerge = True
    model.merge_adapter()
    model.set_adapter("b")
    model.set_adapter(["a", "c"])
    model.unmerge_adapter()
    original = dict(pristine.named_parameters())
    for path, w in _weights(model).items():
        assert torch.equal(w, original[path.replace(".base_layer", "").replace("model.", "", 1) + ".weight"])
    # without the backup bf16 round trips are visibly lossy (why the exact mode exists)
    model.exact_unmerge = False
    model.set_adapter("b")
    model.merge_adapter()
    model.unmerge_adapter()
    lossy = sum(int((w != original[p.replace(".base_layer", "").replace("model.", "", 1) + ".weight"]).sum())
                for p, w in _weights(model).items())
    assert lossy > 0


def test_fused_merge_equals_adding_delta_weight():
    model, pristine = _model()
    model.set_adapter(["a", "b"])
    model.merge_adapter()
    original = dict(pristine.named_parameters())
    for path, w in _weights(model).items():
        layer = model.model.get_submodule(path.replace("model.", "", 1))
        expected = original[path.replace(".base_layer", "").replace("model.", "", 1) + ".weight"].detach().clone()
        for n in ("a", "b"):
            expected += layer.ops.to_base_layout(layer.adapters[n].delta_weight().detach())
        torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-6)


def test_non_finite_adapter_is_refused_before_any_weight_changes():
    model, _ = _model()
    model.merge_adapter()
    before = {p: w.clone() for p, w in _weights(model).items()}
    with torch.no_grad():
        model.model.net[3].adapters["b"].lava_V[0, 0] = float("nan")  # the last layer: all others come first
    with pytest.raises(lp.LavaError, match="non-finite"):
        model.set_adapter("b")
    assert model.merged_adapters == ["a"] and model.active_adapters == ["a"]
    assert all(torch.equal(w, before[p]) for p, w in _weights(model).items())
