"""add_weighted_adapter with PEFT's combination names gives the real ``peft`` 0.21's results.

The same two LoRA adapters (ours, exported with ``export_peft`` and loaded by PEFT) on a tiny
net with a Linear, a Conv2d, an Embedding and a GPT-2 ``Conv1D`` (PEFT's ``fan_in_fan_out``)
are combined by both libraries; the factors (deterministic factor-wise types and ``cat``),
every layer's ``ΔW`` (all types) and the outputs must agree to fp32 rounding.  DARE draws are
aligned by handing ours a generator in the state PEFT's global RNG has at its first draw.
"""

from __future__ import annotations

import peft
from peft.utils.merge_utils import ties
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lava_peft as lp
from _tiny_models import randomize_adapters

TARGETS = ["fc", "conv", "emb", "proj"]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 8)
        self.proj = Conv1D(8, 8)  # GPT-2's transposed linear
        self.conv = nn.Conv2d(2, 5, 3, padding=1)

    def forward(self, ids):
        h = self.proj(torch.relu(self.fc(self.emb(ids))))  # (B, 4, 8)
        img = h.reshape(h.shape[0], 2, 4, 4)
        return self.conv(img).flatten(1)


def _net():
    torch.manual_seed(0)
    return _Net().eval()


IDS = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two LoRA adapters (equal rank, different alpha; ``b`` skips the embedding) saved in PEFT's format."""
    root = tmp_path_factory.mktemp("peft_combine")
    ours = lp.adapt(_net(), lp.LoraConfig(r=2, alpha=3, target_modules=TARGETS), "a")
    ours.add_adapter("b", lp.LoraConfig(r=2, alpha=5, target_modules=["fc", "conv", "proj"]))
    randomize_adapters(ours, 3, std=0.5)
    for name in ("a", "b"):
        lp.export_peft(ours, str(root / name), adapter_name=name)
    return root


def _both(root):
    ours = lp.import_peft(_net(), str(root / "a"), adapter_name="a")
    lp.import_peft(ours, str(root / "b"), adapter_name="b")
    theirs = peft.PeftModel.from_pretrained(_net(), str(root / "a"), adapter_name="a")
    theirs.load_adapter(str(root / "b"), adapter_name="b")
    return ours.eval(), theirs.eval()


def _peft_layer(theirs, path):
    return theirs.base_model.model.get_submodule(path)


def _peft_factors(layer, name):
    """PEFT's ``(A (r, fan_in), B (O, r))`` in our canonical layout."""
    if name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name].detach(), layer.lora_embedding_B[name].detach()
    a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)


def _our_delta_in_base_layout(ours, path, name):
    layer = ours.model.get_submodule(path)
    return layer.ops.to_base_layout(layer.adapters[name].delta_weight().detach())


def _outputs(model, name):
    with torch.no_grad():
        model.set_adapter(name)
        return model(IDS)


def _dare_generator(theirs, kind, kwargs, seed=0):
    """The global RNG state PEFT has when it draws its first DARE mask: after creating the new
    adapter's layers (the same for a probe combination of the same rank that draws nothing)."""
    probe = "svd" if kind.endswith("_svd") else "linear"
    extra = {k: v for k, v in kwargs.items() if k == "svd_rank"}
    torch.manual_seed(seed)
    theirs.add_weighted_adapter(["a", "b"], [0.7, -1.3], f"probe_{kind}", combination_type=probe, **extra)
    gen = torch.Generator()
    gen.set_state(torch.get_rng_state())
    theirs.delete_adapter(f"probe_{kind}")
    torch.manual_seed(seed)
    return gen


CASES = {
    "cat": {},
    "linear": {},
    "ties": dict(density=0.5),
    "ties_frequency": dict(density=0.4, majority_sign_method="frequency"),
    "magnitude_prune": dict(density=0.6),
    "dare_linear": dict(density=0.5),
    "dare_ties": dict(density=0.7),
    "svd": {},
    "svd_rank1_clamp": dict(svd_rank=1, svd_clamp=0.9),
    "ties_svd": dict(density=0.5, svd_rank=3),
    "dare_linear_svd": dict(density=0.5),
    "dare_ties_svd": dict(density=0.6, svd_clamp=0.95),
    "magnitude_prune_svd": dict(density=0.3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_combination_equals_peft(case, exported):
    kind = case.split("_rank")[0].replace("_frequency", "")
    kwargs = CASES[case]
    ours, theirs = _both(exported)
    gen = None
    if kind.startswith("dare"):
        gen = _dare_generator(theirs, kind, kwargs)
    theirs.add_weighted_adapter(["a", "b"], [0.7, -1.3], "m", combination_type=kind, **kwargs)
    report = ours.add_weighted_adapter(["a", "b"], [0.7, -1.3], "m", kind, generator=gen, **kwargs)
    assert report.method == "lora"
    for path in TARGETS:
        mine = _our_delta_in_base_layout(ours, path, "m")
        peft_layer = _peft_layer(theirs, path)
        torch.testing.assert_close(mine, peft_layer.get_delta_weight("m").detach(), rtol=2e-5, atol=2e-6)
        our_layer = ours.model.get_submodule(path).adapters["m"]
        a, b = _peft_factors(peft_layer, "m")
        if not kind.endswith("svd") and (kind != "cat" or path != "emb"):  # PEFT pads cat to Σ r (emb: only a)
            torch.testing.assert_close(our_layer.lora_A.detach(), a, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(our_layer.lora_B.detach(), b, rtol=1e-6, atol=1e-7)
        assert our_layer.scale == peft_layer.scaling["m"] == 1.0
    tol = 1e-4 if kind.endswith("svd") else 1e-5  # PEFT's SVD runs in fp32, ours (without a clamp) in float64
    torch.testing.assert_close(_outputs(ours, "m"), _outputs(theirs, "m"), rtol=tol, atol=tol)
    # the PEFT-named combination is not the no-op: it changes the outputs of the base
    with torch.no_grad(), theirs.disable_adapter():
        assert not torch.allclose(theirs(IDS), _outputs(ours, "m"), atol=1e-3)


def test_peft_linear_is_not_the_exact_sum_but_cat_and_exact_linear_are(exported):
    ours, _ = _both(exported)
    ours.add_weighted_adapter(["a", "b"], [0.7, -1.3], "lin", "linear")
    ours.add_weighted_adapter(["a", "b"], [0.7, -1.3], "cat", "cat")
    ours.add_weighted_adapter(["a", "b"], [0.7, -1.3], "exact", "exact_linear")
    layer = ours.model.fc
    exact = 0.7 * layer.adapters["a"].delta_weight() - 1.3 * layer.adapters["b"].delta_weight()
    torch.testing.assert_close(layer.adapters["cat"].delta_weight(), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.adapters["exact"].delta_weight(), exact, rtol=1e-5, atol=1e-6)
    gap = (layer.adapters["lin"].delta_weight() - exact).norm() / exact.norm()
    assert gap > 0.1  # PEFT's factor-wise sum has the cross terms B_a A_b


def test_dare_masks_follow_the_generator_and_differ_from_other_seeds(exported):
    ours, _ = _both(exported)
    for name, seed in (("d1", 1), ("d2", 1), ("d3", 2)):
        ours.add_weighted_adapter(["a", "b"], [1, 1], name, "dare_ties", density=0.5, seed=seed)
    deltas = {n: ours.model.fc.adapters[n].delta_weight() for n in ("d1", "d2", "d3")}
    assert torch.equal(deltas["d1"], deltas["d2"]) and not torch.equal(deltas["d1"], deltas["d3"])


def test_lava_inputs_follow_the_same_rules_conv_lava_gives_lora():
    """LAVA is B = U, A = V (Linear) or A = V ⊙ P flattened (conv CP): the factor-wise rules act on those."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    model = lp.adapt(net, lp.LavaConfig(r=2, alpha=3, target_modules=["0", "2"]), "a")
    model.add_adapter("b", lp.LavaConfig(r=2, alpha=2, target_modules=["0", "2"]))
    randomize_adapters(model, 4)
    report = model.add_weighted_adapter(["a", "b"], [0.5, 2.0], "t", "ties", density=0.5)
    assert report.method == "lora"  # the conv result is a flattened matrix, which LAVA stores as CP
    for path in ("0", "2"):
        layer = model.model.get_submodule(path)
        a, b = layer.adapters["a"], layer.adapters["b"]
        downs, ups = [], []
        for ad in (a, b):
            down = ad.lava_V.detach()
            for p in ad.lava_P:
                down = (down.unsqueeze(-1) * p.detach().unsqueeze(1)).reshape(down.shape[0], -1)
            downs.append(down)
            ups.append(ad.lava_U.detach())
        c = [0.5 * a.scale, 2.0 * b.scale]
        ref_a = ties(downs, torch.tensor([x ** 0.5 for x in c]), 0.5)
        ref_b = ties(ups, torch.tensor([x ** 0.5 for x in c]), 0.5)
        got = layer.adapters["t"]
        torch.testing.assert_close(got.lora_A.detach(), ref_a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got.lora_B.detach(), ref_b, rtol=1e-6, atol=1e-7)
