"""MoSA (Mixture of Sparse Adapters): partitions, the module controller, masked training forwards,
merging into a plain adapter, the consistency objective, files, errors, and MiniLM.

Every expectation is computed independently of ``lava_peft.methods.mosa`` (masks from
``torch.randperm`` with the documented seed, ΔW by einsum, KL from softmax by hand).
"""

from __future__ import annotations

import copy
import json
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import lava_peft as lp
import lava_peft.methods.mosa as mosa
import lava_peft.tools.mosa as mosa_tools
from lava_peft.methods.mosa import MosaConfig
from tests._tiny_models import randomize_adapters
from tests.test_fastpaths import _grad_fn_names

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), lambda: torch.randn(4, 12)),
    "conv2d": (lambda: nn.Conv2d(6, 8, 3, padding=1, stride=2), lambda: torch.randn(2, 6, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(4, 6, (3, 2, 2), padding=1), lambda: torch.randn(2, 4, 5, 5, 5)),
    "embedding": (lambda: nn.Embedding(20, 10, padding_idx=0), lambda: torch.randint(0, 20, (3, 5))),
}
UP_DOWN = {"lora": ("lora_B", "lora_A"), "lava": ("lava_U", "lava_V")}


def _model(layer="linear", torch_seed=0, randomize=True, **cfg):
    torch.manual_seed(torch_seed)
    make_layer, make_input = LAYERS[layer]
    base = nn.Sequential(make_layer())
    pristine = copy.deepcopy(base)
    x = make_input()
    cfg = {"r": 2, "alpha": 4.0, "target_modules": ["0"], **cfg}
    model = lp.adapt(base, MosaConfig(adapter="factors", **cfg))
    if randomize:
        randomize_adapters(model, seed=torch_seed + 1)
    return model, pristine, x


def _adapter(model):
    return model.model[0].adapters["default"]


def _factors(adapter):
    """Copies of the full factors, up first: LoRA ``B, A``; LAVA ``U, V`` (and ``P_m`` on convs)."""
    if isinstance(adapter, mosa.MosaLoraAdapter):
        keys = list(UP_DOWN["lora"])
    else:
        keys = [*UP_DOWN["lava"], *(f"lava_P.{m}" for m in range(len(adapter.spec.kernel_size)))]
    return {k: adapter.factor(k).detach().clone() for k in keys}


def _hand_masks(shape, n_modules, seed, path, key):
    """The documented partition, rebuilt from torch.randperm: module k = k-th consecutive slice."""
    numel = math.prod(shape)
    gen_seed = (seed * 1_000_003 + zlib.crc32(f"{path}:{key}".encode())) % 2**63
    perm = torch.randperm(numel, generator=torch.Generator().manual_seed(gen_seed))
    base, extra = divmod(numel, n_modules)
    masks, start = [], 0
    for k in range(n_modules):
        stop = start + base + (k < extra)
        m = torch.zeros(numel, dtype=torch.bool)
        m[perm[start:stop]] = True
        masks.append(m.view(shape))
        start = stop
    return masks


def _hand_delta(f, scale, shape):
    """ΔW from raw factors (LoRA: B A reshaped; LAVA: CP einsum)."""
    if "lora_B" in f:
        return (f["lora_B"] @ f["lora_A"]).reshape(shape) * scale
    ps = [f[k] for k in sorted(k for k in f if k.startswith("lava_P."))]
    letters = "abc"[: len(ps)]
    eq = "oj,ji," + ",".join(f"j{c}" for c in letters) + "->oi" + letters if ps else "oj,ji->oi"
    return torch.einsum(eq, f["lava_U"], f["lava_V"], *ps) * scale


def _hand_output(layer_base, x, delta, kind):
    if kind == "embedding":
        return F.embedding(x, layer_base.weight + delta.T, layer_base.padding_idx)
    if kind == "linear":
        return F.linear(x, layer_base.weight + delta, layer_base.bias)
    return layer_base._conv_forward(x, layer_base.weight + delta, layer_base.bias)


# =============================================================================== partitions
@pytest.mark.parametrize("factorization,layer", [("lora", "linear"), ("lora", "conv2d"), ("lava", "conv3d")])
def test_masks_partition_every_split_factor_and_follow_the_seed(factorization, layer):
    cfg = {"factorization": factorization, "split": "all", "n_modules": 3}
    adapter = _adapter(_model(layer, **cfg)[0])
    assert set(adapter.split_keys) == set(_factors(adapter))  # "all": every factor, LAVA's P_m too
    for key in adapter.split_keys:
        shape = tuple(adapter.factor(key).shape)
        masks = [adapter.module_mask(key, k) for k in range(3)]
        assert torch.equal(torch.stack(masks).sum(0), torch.ones(shape, dtype=torch.int64))  # disjoint, union = all
        sizes = sorted(int(m.sum()) for m in masks)
        assert sizes[0] >= 1 and sizes[-1] - sizes[0] <= 1 and sum(sizes) == math.prod(shape)
        for k, expected in enumerate(_hand_masks(shape, 3, 0, "0", key)):
            assert torch.equal(masks[k], expected), (key, k)
    # a function of the seed (and path, factor, shape) alone: other weights / RNG state do not matter
    same_seed = _adapter(_model(layer, torch_seed=5, **cfg)[0])
    assert all(torch.equal(same_seed.module_mask(k, 1), adapter.module_mask(k, 1)) for k in adapter.split_keys)
    reseeded = _adapter(_model(layer, seed=7, **cfg)[0])
    assert any(not torch.equal(reseeded.module_mask(k, 1), adapter.module_mask(k, 1)) for k in adapter.split_keys)
    key = adapter.split_keys[0]
    assert torch.equal(reseeded.module_mask(key, 2), _hand_masks(tuple(adapter.factor(key).shape), 3, 7, "0", key)[2])
    assert set(adapter.state_dict()) == set(_factors(adapter))  # masks are never saved


def test_split_up_and_down_pick_one_factor():
    for split, factorization, expected in [("up", "lora", "lora_B"), ("down", "lora", "lora_A"),
                                           ("up", "lava", "lava_U"), ("down", "lava", "lava_V")]:
        model, _, _ = _model("conv2d", factorization=factorization, split=split, randomize=False)
        adapter = _adapter(model)
        assert adapter.split_keys == (expected,)
        assert adapter.train_scale == pytest.approx(adapter.scale * 4)  # c = N^|S| = 4
    model, _, _ = _model("conv2d", factorization="lava", split="all", n_modules=2, rescale=False, randomize=False)
    assert _adapter(model).train_scale == _adapter(model).scale


# =============================================================================== training forward
@pytest.mark.parametrize("factorization", ["lora", "lava"])
@pytest.mark.parametrize("layer", ["linear", "conv2d", "conv3d", "embedding"])
def test_training_forward_with_module_k_equals_masked_hand_computation(factorization, layer):
    n, split = 3, "all"
    model, pristine, x = _model(layer, factorization=factorization, split=split, n_modules=n)
    adapter = _adapter(model)
    f = _factors(adapter)
    kind = adapter.spec.kind
    model.train()
    for k in range(n):
        mosa_tools.set_module(model, k)
        with torch.no_grad():
            out = model(x)
        masked = {key: v * _hand_masks(tuple(v.shape), n, 0, "0", key)[k] for key, v in f.items()}
        c = n ** len(f)  # rescale: N per split factor
        expected = _hand_output(pristine[0], x, _hand_delta(masked, adapter.scale * c, adapter.spec.canonical_shape),
                                kind)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert adapter.last_module == k
    # eval: the full factors (the merged adapter), and no module is drawn
    step = mosa_tools.module_sampler(model).step
    model.eval()
    with torch.no_grad():
        full = _hand_output(pristine[0], x, _hand_delta(f, adapter.scale, adapter.spec.canonical_shape), kind)
        torch.testing.assert_close(model(x), full, rtol=1e-5, atol=1e-5)
    assert mosa_tools.module_sampler(model).step == step


def test_training_on_a_linear_runs_the_fused_node_with_the_masked_factors():
    model, _, x = _model("linear", n_modules=4)
    model.train()
    assert "_LowRankLinearBackward" in _grad_fn_names(model(x))
    dropped, _, x = _model("linear", n_modules=4, dropout=0.1)
    dropped.train()
    assert "_LowRankLinearBackward" not in _grad_fn_names(dropped(x))  # adapter dropout: the composed path


def test_rescale_false_is_the_literal_masked_forward_and_up_split_keeps_down_whole():
    model, pristine, x = _model("linear", split="up", n_modules=4, rescale=False)
    adapter = _adapter(model)
    f = _factors(adapter)
    mosa_tools.set_module(model, 2)
    model.train()
    mask = _hand_masks((10, 2), 4, 0, "0", "lora_B")[2]
    expected = pristine[0](x) + adapter.scale * (x @ f["lora_A"].T) @ (f["lora_B"] * mask).T
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factorization,layer,dropout", [("lora", "linear", 0.0), ("lora", "linear", 0.2),
                                                          ("lora", "conv2d", 0.0), ("lava", "conv3d", 0.0),
                                                          ("lava", "embedding", 0.0)])
def test_gradients_reach_only_module_k_entries(factorization, layer, dropout):
    for split in ("up", "all"):
        model, _, x = _model(layer, factorization=factorization, split=split, n_modules=3, dropout=dropout)
        adapter = _adapter(model)
        model.train()
        mosa_tools.set_module(model, 1)
        model.zero_grad()
        model(x).float().pow(2).sum().backward()
        for key in _factors(adapter):
            grad = adapter.factor(key).grad
            assert grad is not None and torch.count_nonzero(grad) > 0, key
            if key in adapter.split_keys:
                mask = _hand_masks(tuple(grad.shape), 3, 0, "0", key)[1]
                assert torch.count_nonzero(grad[~mask]) == 0, key
                assert torch.count_nonzero(grad[mask]) > 0, key
            elif layer != "embedding":  # an unsplit factor gets its dense gradient
                assert torch.count_nonzero(grad) > grad.numel() // 2, key


# =============================================================================== merge
@pytest.mark.parametrize("factorization,layer", [("lora", "linear"), ("lora", "conv2d"), ("lava", "linear"),
                                                 ("lava", "conv2d"), ("lava", "conv3d")])
def test_sum_of_module_deltas_is_the_full_delta(factorization, layer):
    for split in ("up", "down"):
        model, _, _ = _model(layer, factorization=factorization, split=split, n_modules=4)
        adapter = _adapter(model)
        full = _hand_delta(_factors(adapter), adapter.scale, adapter.spec.canonical_shape)
        with torch.no_grad():
            torch.testing.assert_close(adapter.delta_weight(), full, rtol=1e-5, atol=1e-6)
            parts = [adapter.module_delta_weight(k) for k in range(4)]
            assert all(torch.count_nonzero(p) for p in parts)
            torch.testing.assert_close(sum(parts), full, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(adapter.module_delta_weight(3, rescaled=True), 4 * parts[3])


def test_all_split_sums_over_every_combination_of_parts():
    """ΔW is multilinear in the factors: with U, V, P1, P2 split it is the sum over all N^4 choices of one part
    per factor (the N same-index modules alone miss the cross terms)."""
    n = 2
    model, _, _ = _model("conv2d", factorization="lava", split="all", n_modules=n)
    adapter = _adapter(model)
    f = _factors(adapter)
    shape = adapter.spec.canonical_shape
    keys = list(f)
    masks = {key: _hand_masks(tuple(v.shape), n, 0, "0", key) for key, v in f.items()}
    total = torch.zeros(shape)
    for choice in range(n ** len(keys)):
        ks = [(choice // n**i) % n for i in range(len(keys))]
        total += _hand_delta({key: f[key] * masks[key][k] for key, k in zip(keys, ks)}, adapter.scale, shape)
    with torch.no_grad():
        torch.testing.assert_close(total, adapter.delta_weight(), rtol=1e-5, atol=1e-5)
        same_index = sum(adapter.module_delta_weight(k) for k in range(n))
    assert not torch.allclose(same_index, total, atol=1e-3)


def _train(model, x, steps=3, lr=0.05):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("factorization,layer", [("lora", "linear"), ("lora", "conv2d"), ("lava", "conv3d"),
                                                 ("lava", "embedding")])
def test_eval_forward_equals_the_merged_plain_adapter_exactly(factorization, layer):
    model, pristine, x = _model(layer, factorization=factorization, split="all", n_modules=2)
    _train(model, x)
    model.eval()
    with torch.no_grad():
        ours = model(x)
    # an independently built plain adapter holding the same tensors
    plain_cls = lp.LoraConfig if factorization == "lora" else lp.LavaConfig
    extra = {"orth_lambda": 0.0} if factorization == "lava" else {}
    plain = lp.adapt(copy.deepcopy(pristine), plain_cls(r=2, alpha=4.0, target_modules=["0"], **extra)).eval()
    plain.model[0].adapters["default"].load_state_dict(_adapter(model).state_dict())
    with torch.no_grad():
        assert torch.equal(plain(x), ours)
    # merge_modules: the same adapter name becomes a plain adapter, outputs bit for bit equal
    config = mosa_tools.merge_modules(model)
    assert type(config) is plain_cls and model.peft_config["default"] is config
    assert type(_adapter(model)) is type(plain.model[0].adapters["default"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".adapters." in n}
    with torch.no_grad():
        assert torch.equal(model(x), ours)
        model.merge_adapter()
        torch.testing.assert_close(model(x), ours, rtol=1e-5, atol=1e-5)


def test_merge_modules_keeps_a_merged_state_and_exports_as_peft_lora(tmp_path):
    model, pristine, x = _model("linear", n_modules=4)
    _train(model, x)
    model.eval()
    model.exact_unmerge = True  # unmerge restores the base weight bit for bit
    with torch.no_grad():
        ref = model(x)
        model.merge_adapter()
        merged_weight = model.model[0].base_layer.weight.clone()
    mosa_tools.merge_modules(model)
    assert model.merged_adapters == ["default"]
    assert torch.equal(model.model[0].base_layer.weight, merged_weight)
    model.unmerge_adapter()
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    lp.export_peft(model, str(tmp_path))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    a = _adapter(model)
    assert torch.equal(tensors["base_model.model.0.lora_A.weight"], a.lora_A)
    assert torch.equal(tensors["base_model.model.0.lora_B.weight"], a.lora_B)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    imported = lp.import_peft(copy.deepcopy(pristine), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(imported(x), ref, rtol=1e-6, atol=1e-6)


# =============================================================================== controller
def _deep_model(torch_seed=0, n_layers=6, **cfg):
    torch.manual_seed(torch_seed)
    layers = []
    for _ in range(n_layers):
        layers += [nn.Linear(8, 8), nn.Tanh()]
    base = nn.Sequential(*layers, nn.Linear(8, 3))
    targets = [str(2 * i) for i in range(n_layers)]
    model = lp.adapt(base, MosaConfig(adapter="factors", r=2, alpha=4.0, target_modules=targets, **cfg))
    randomize_adapters(model, seed=torch_seed + 1)
    return model


def _module_trace(model, x, steps):
    model.train()
    trace = []
    with torch.no_grad():
        for _ in range(steps):
            model(x)
            trace.append([a.last_module for _, a in model.adapter_layers()])
    return trace


def test_controller_draws_once_per_layer_and_forward_reproducibly_from_the_seed():
    x = torch.randn(4, 8)
    model = _deep_model(n_modules=4)
    trace = _module_trace(model, x, 12)
    sampler = mosa_tools.module_sampler(model)
    assert sampler.step == 11  # one step per training forward: every layer drew exactly once each time
    assert trace == _module_trace(_deep_model(torch_seed=3, n_modules=4), x, 12)  # the seed alone decides
    assert trace != _module_trace(_deep_model(n_modules=4, seed=9), x, 12)
    assert trace[5] == [sampler.module(5, i) for i in range(6)]  # the pure function of (seed, step, layer)
    assert {k for row in trace for k in row} == {0, 1, 2, 3}
    assert any(len(set(row)) > 1 for row in trace)  # per_layer: layers draw independently
    model.eval()  # evaluation forwards draw nothing
    with torch.no_grad():
        model(x)
    assert sampler.step == 11
    dropped = _deep_model(n_modules=4, dropout=0.1)  # unfused path (adapter dropout): still one draw per call
    _module_trace(dropped, x, 5)
    assert mosa_tools.module_sampler(dropped).step == 4
    glob = _module_trace(_deep_model(n_modules=4, module_sampling="global"), x, 10)
    assert all(len(set(row)) == 1 for row in glob) and len({row[0] for row in glob}) > 1


def test_set_module_fixes_every_layer_and_none_restores_draws():
    x = torch.randn(4, 8)
    model = _deep_model(n_modules=3)
    mosa_tools.set_module(model, 2)
    assert all(row == [2] * 6 for row in _module_trace(model, x, 3))
    mosa_tools.set_module(model, None)
    assert any(row != [2] * 6 for row in _module_trace(model, x, 6))


def test_checkpoint_recomputation_reuses_the_forward_module():
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(4, 8)
    model = _deep_model(n_modules=4)
    model.train()
    sampler = mosa_tools.module_sampler(model)
    out = checkpoint(model, x, use_reentrant=False)
    step, used = sampler.step, [a.last_module for _, a in model.adapter_layers()]
    out.pow(2).sum().backward()  # recomputes every layer inside the backward pass
    assert sampler.step == step and [a.last_module for _, a in model.adapter_layers()] == used
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    replay = copy.deepcopy(model)  # no checkpointing, each layer fixed to the module it used
    replay.zero_grad(set_to_none=True)
    modules, h = iter(used), x
    for layer in replay.model:
        if isinstance(layer, lp.AdaptedLayer):
            mosa_tools.set_module(replay, next(modules))
        h = layer(h)
    h.pow(2).sum().backward()
    for n, p in replay.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6)


# =============================================================================== consistency objective
def test_symmetric_kl_matches_the_definition_with_and_without_a_row_mask():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    p, q = a.softmax(-1), b.softmax(-1)
    per_row = 0.5 * ((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1))
    torch.testing.assert_close(mosa_tools.symmetric_kl(a, b), per_row.mean())
    mask = torch.rand(3, 5) > 0.4
    torch.testing.assert_close(mosa_tools.symmetric_kl(a, b, mask), per_row[mask].mean())
    assert mosa_tools.symmetric_kl(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert mosa_tools.symmetric_kl(a, b, torch.zeros(3, 5, dtype=torch.bool)).item() == 0.0


def _classifier(n_modules=4, **cfg):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    model = lp.adapt(base, MosaConfig(adapter="factors", r=2, alpha=4.0, n_modules=n_modules, target_modules=["0", "2"], **cfg))
    randomize_adapters(model, seed=1)
    batch = {"x": torch.randn(6, 8), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    return model, batch


def test_consistency_loss_equals_hand_symmetric_kl_and_is_zero_for_one_module():
    model, batch = _classifier()
    model.train()
    out = mosa_tools.mosa_consistency_loss(model, batch, modules=(0, 3))
    with torch.no_grad():
        mosa_tools.set_module(model, 0)
        la = model(batch["x"])
        mosa_tools.set_module(model, 3)
        lb = model(batch["x"])
        mosa_tools.set_module(model, None)
    p, q = la.softmax(-1), lb.softmax(-1)
    hand = (0.5 * ((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1))).mean()
    torch.testing.assert_close(out.loss, hand, rtol=1e-5, atol=1e-7)
    assert out.loss.item() > 1e-4 and out.loss.requires_grad
    assert torch.equal(out.logits_a.detach(), la) and torch.equal(out.logits_b.detach(), lb)
    same = mosa_tools.mosa_consistency_loss(model, batch, modules=(2, 2))
    assert same.loss.item() == 0.0
    sampler = mosa_tools.module_sampler(model)
    assert sampler.fixed is None and sampler.avoid is None


def test_consistency_loss_draws_independently_by_default_as_the_reference():
    """The reference samples each forward's modules afresh: pass B equals the sampler's next step, so it
    coincides with pass A in some layers (6 layers, N = 2)."""
    model = _deep_model(n_modules=2)
    model.train()
    batch = {"x": torch.randn(4, 8)}
    seen = []

    def forward(m, b):
        out = m(b["x"])
        seen.append([a.last_module for _, a in model.adapter_layers()])
        return out

    sampler = mosa_tools.module_sampler(model)
    coincide = 0
    for _ in range(4):
        seen.clear()
        step = sampler.next_step()
        mosa_tools.mosa_consistency_loss(model, batch, forward_fn=forward)
        assert seen[0] == [sampler.module(step, i) for i in range(6)]
        assert seen[1] == [sampler.module(step + 1, i) for i in range(6)]
        coincide += sum(a == b for a, b in zip(*seen))
    assert coincide > 0


def test_consistency_loss_distinct_draws_a_different_module_in_every_layer():
    model = _deep_model(n_modules=4)
    model.train()
    batch = {"x": torch.randn(4, 8)}
    seen = []

    def forward(m, b):
        out = m(b["x"])
        seen.append([a.last_module for _, a in model.adapter_layers()])
        return out

    for _ in range(5):
        seen.clear()
        mosa_tools.mosa_consistency_loss(model, batch, forward_fn=forward, distinct=True)
        assert all(ka != kb for ka, kb in zip(*seen)), seen
    mosa_tools.set_module(model, 1)  # a fixed module: forward B still differs
    seen.clear()
    mosa_tools.mosa_consistency_loss(model, batch, forward_fn=forward, distinct=True)
    assert seen[0] == [1] * 6 and 1 not in seen[1]
    assert mosa_tools.module_sampler(model).fixed == 1


def test_loss_fn_for_the_trainer_adds_the_weighted_kl_in_training_only(tmp_path):
    model, batch = _classifier(n_modules=2)
    loss_fn = mosa_tools.mosa_loss_fn(weight=0.5, distinct=True)
    model.train()
    mosa_tools.set_module(model, 0)  # forward A: module 0; forward B: the only other one, module 1
    loss, logits = loss_fn(model, batch)
    with torch.no_grad():
        la = model(batch["x"])
        mosa_tools.set_module(model, 1)
        lb = model(batch["x"])
    p, q = la.softmax(-1), lb.softmax(-1)
    kl = (0.5 * ((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1))).mean()
    torch.testing.assert_close(loss, F.cross_entropy(la, batch["labels"]) + 0.5 * kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, la)
    model.eval()
    loss, logits = loss_fn(model, batch)
    with torch.no_grad():
        full = model(batch["x"])
    torch.testing.assert_close(loss, F.cross_entropy(full, batch["labels"]))
    # the Trainer's objective hook: loss_fn=
    mosa_tools.set_module(model, None)
    data = {"x": torch.randn(32, 8), "labels": torch.randint(0, 3, (32,))}
    trainer = lp.Trainer(model, lp.TrainingArguments(output_dir=str(tmp_path), max_steps=4, batch_size=16, lr=1e-2,
                                                     progress=False, summary=False, save_final=False,
                                                     save_best=False),
                         data, data, loss_fn=loss_fn)
    before = _adapter_tensors(model)
    trainer.train()
    assert any(not torch.equal(before[n], t) for n, t in _adapter_tensors(model).items())


def _adapter_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." in n}


def test_consistency_loss_refuses_activation_checkpointing():
    from tests._tiny_models import tiny_bert

    model = lp.adapt(tiny_bert(), MosaConfig(adapter="factors", r=2, n_modules=2, target_modules=["query", "value"]))
    hf = model.model  # transformers >= 5 renamed the switch; older ones only have gradient_checkpointing_enable
    (getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable)()
    model.train()
    batch = {"input_ids": torch.randint(0, 64, (2, 6)), "labels": torch.tensor([0, 1])}
    with pytest.raises(lp.LavaConfigError, match="checkpointing"):
        mosa_tools.mosa_consistency_loss(model, batch)


# =============================================================================== files
@pytest.mark.parametrize("factorization,layer", [("lora", "conv2d"), ("lava", "conv3d")])
def test_save_load_gives_the_same_eval_outputs_and_the_same_modules(factorization, layer, tmp_path):
    model, pristine, x = _model(layer, factorization=factorization, split="all", n_modules=2)
    _train(model, x)
    model.save_pretrained(tmp_path)
    payload = json.loads((tmp_path / "adapter_config.json").read_text())
    assert payload["method"] == "mosa" and payload["config"]["n_modules"] == 2
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"0.{k}" for k in _factors(_adapter(model))}  # the plain adapter's tensors, no masks
    loaded = lp.AdaptedModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # masks are rebuilt identically: a trainable reload trains the same modules
    resumed = lp.AdaptedModel.from_pretrained(copy.deepcopy(pristine), tmp_path, is_trainable=True)
    for key in _adapter(model).split_keys:
        assert torch.equal(_adapter(resumed).module_mask(key, 1), _adapter(model).module_mask(key, 1))
    resumed.train()
    model.train()
    mosa_tools.set_module(resumed, 1)
    mosa_tools.set_module(model, 1)
    with torch.no_grad():
        assert torch.equal(resumed(x), model(x))


# =============================================================================== errors
def test_config_errors_name_the_field():
    with pytest.raises(lp.LavaConfigError, match="n_modules must be an integer >= 2"):
        MosaConfig(adapter="factors", target_modules=["0"], n_modules=1)
    with pytest.raises(lp.LavaConfigError, match="n_modules"):
        MosaConfig(adapter="factors", target_modules=["0"], n_modules=True)
    with pytest.raises(lp.LavaConfigError, match="split must be"):
        MosaConfig(adapter="factors", target_modules=["0"], split="left")
    with pytest.raises(lp.LavaConfigError, match="module_sampling"):
        MosaConfig(adapter="factors", target_modules=["0"], module_sampling="per_step")
    with pytest.raises(lp.LavaConfigError, match="factorization='lava' only"):
        MosaConfig(adapter="factors", target_modules=["0"], orth_lambda=0.1)
    with pytest.raises(lp.LavaConfigError, match="init"):
        MosaConfig(adapter="factors", target_modules=["0"], factorization="lava", init="gaussian")
    with pytest.raises(lp.LavaConfigError, match="seed"):
        MosaConfig(adapter="factors", target_modules=["0"], seed=-1)
    cfg = MosaConfig(adapter="factors", target_modules=["0"], factorization="lava", orth_lambda=0.2, n_modules=3)
    assert MosaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.regularization_weight() == 0.2


def test_too_many_modules_for_a_factor_is_refused_before_anything_changes():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 3), nn.Conv2d(3, 4, 1))
    before = copy.deepcopy(base.state_dict())
    model = lp.AdaptedModel(base)
    # LoRA up factor B of the Linear: 3x1 = 3 entries < 4 modules
    with pytest.raises(lp.LavaConfigError, match=r"n_modules=4 is larger than the lora_B factor \(3, 1\)"):
        model.add_adapter("a", MosaConfig(adapter="factors", r=1, target_modules=["0", "1"]))
    # LAVA spatial factors of a 1x1 conv have r entries: split="all" with r=2 < 3 modules
    with pytest.raises(lp.LavaConfigError, match="lava_P.0"):
        model.add_adapter("a", MosaConfig(adapter="factors", r=2, target_modules=["1"], factorization="lava", split="all", n_modules=3))
    assert model.peft_config == {} and not list(model.adapter_layers("a"))
    assert isinstance(model.model[0], nn.Linear) and isinstance(model.model[1], nn.Conv2d)
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())
    model.add_adapter("a", MosaConfig(adapter="factors", r=2, target_modules=["1"], factorization="lava", split="up", n_modules=3))


def test_model_level_errors():
    model, batch = _classifier()
    with pytest.raises(lp.LavaConfigError, match=r"module 4 does not exist; use an integer in \[0, 3\]"):
        mosa_tools.set_module(model, 4)
    assert mosa_tools.module_sampler(model).fixed is None
    with pytest.raises(lp.LavaConfigError, match="does not exist"):
        _adapter(model).module_factors(-1)
    with pytest.raises(lp.LavaConfigError, match="modules must be a pair"):
        mosa_tools.mosa_consistency_loss(model, batch, modules=(1,))
    model.eval()
    with pytest.raises(lp.LavaError, match="model.train"):
        mosa_tools.mosa_consistency_loss(model, batch)
    with pytest.raises(lp.LavaConfigError, match="weight"):
        mosa_tools.mosa_loss_fn(weight=-1.0)
    model.add_adapter("plain", lp.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(lp.LavaConfigError, match="'lora' adapter; this needs a 'mosa' adapter"):
        mosa_tools.merge_modules(model, "plain")
    model.set_adapter("plain")
    model.train()
    with pytest.raises(lp.LavaConfigError, match="no active MoSA adapter"):
        mosa_tools.mosa_consistency_loss(model, batch)
    with pytest.raises(lp.AdapterNameError):
        mosa_tools.set_module(model, 0, adapter_name="missing")


# =============================================================================== real data
@pytest.mark.integration
def test_minilm_query_value_mosa_trains_and_merges_into_an_identical_lora(tmp_path):
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lava_peft.train.tasks import load_text_data, minilm_path

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    train, _ = load_text_data(tok, 16, 4, seed=0, max_len=32)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    finally:
        transformers.logging.set_verbosity(verbosity)
    pristine = copy.deepcopy(base)
    model = lp.adapt(base, MosaConfig(adapter="factors", r=4, alpha=8.0, n_modules=4, target_modules=["query", "value"],
                                      modules_to_save=["classifier"]))
    assert len(model.adapter_layers()) == 12
    inputs = {k: v for k, v in train.items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, pristine.eval()(**inputs).logits)  # ΔW = 0 at init
        eval_before = F.cross_entropy(model(**inputs).logits, train["labels"]).item()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    loss_fn = mosa_tools.mosa_loss_fn(weight=1.0)
    b0 = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_B")}
    model.train()
    for _ in range(6):
        opt.zero_grad()
        loss, _ = loss_fn(model, train)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    assert F.cross_entropy(logits, train["labels"]).item() < eval_before
    # every layer's B (the split factor, zero at init) has trained entries
    assert all(not torch.equal(b0[n], p) for n, p in model.named_parameters() if n.endswith("lora_B"))
    mosa_tools.merge_modules(model)
    assert model.peft_config["default"].method == "lora"
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)
    model.save_pretrained(tmp_path / "lora")
    reloaded = lp.AdaptedModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "lora"))
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, logits)


def test_export_peft_of_a_mosa_adapter_points_to_merge_modules(tmp_path):
    model = lp.adapt(nn.Sequential(nn.Linear(6, 4)), lp.MosaConfig(adapter="factors", r=2, target_modules=["0"], n_modules=2))
    with pytest.raises(lp.LavaConfigError, match="merge_modules"):
        lp.export_peft(model, str(tmp_path / "peft"))
    assert not (tmp_path / "peft").exists()
