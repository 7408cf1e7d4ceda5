"""SHiRA (sparse high-rank adapters) and the sparse-delta machinery, against independent computations.

The contract (merge/disable/save/grad on every layer type) runs for SHiRA in
test_contract.py; here: the sparse math, budgets, every mask builder, calibration,
files, the scatter merge/switch, sparse combination, diagnostics, and real MiniLM.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import lava_peft as lp
from _files import drop_manifest
from lava_peft import diagnostics
from lava_peft.methods import sparse_masks as sm
from lava_peft.tools import sparse_masks as sm_tools
from lava_peft.methods.shira import SAVED_MASKS, ShiraAdapter, ShiraConfig
from lava_peft.tools.shira import export_peft_shira, with_masks
from test_contract import GPT2Conv1D


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), lambda: torch.randn(3, 7)),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), lambda: torch.randn(2, 4, 5, 5)),
    "gpt2_conv1d": (lambda: GPT2Conv1D(5, 7), lambda: torch.randn(2, 3, 7)),
    "embedding": (lambda: nn.Embedding(9, 4), lambda: torch.randint(0, 9, (2, 5))),
}
TRANSPOSED = ("gpt2_conv1d", "embedding")  # base layout = canonical layout transposed


def _canonical(layer_name, weight):
    return weight.T if layer_name in TRANSPOSED else weight


def _build(layer_name, seed=0, **cfg):
    torch.manual_seed(seed)
    make_layer, make_input = LAYERS[layer_name]
    base = nn.Sequential(make_layer())
    pristine = copy.deepcopy(base)
    x = make_input()
    cfg.setdefault("r", 1)
    model = lp.adapt(base, ShiraConfig(target_modules=["0"], **cfg))
    return model, pristine, x


def _randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sparse_values"):
                p.copy_(torch.randn(p.shape, generator=gen))


def _adapter(model, name="default", path="0"):
    return model.model.get_submodule(path).adapters[name]


def _dense_by_hand(adapter, alpha):
    """ΔW in the canonical layout from the stored indices/values, in NumPy (float64)."""
    dense = np.zeros(math.prod(adapter.spec.canonical_shape))
    dense[adapter.sparse_indices.numpy()] = alpha * adapter.sparse_values.detach().double().numpy()
    return dense.reshape(adapter.spec.canonical_shape)


# =============================================================================== sparse math
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_sparse_apply_equals_the_dense_masked_update(layer_name):
    model, pristine, x = _build(layer_name, r=1, alpha=0.75)
    _randomize(model)
    adapter = _adapter(model)
    dense = _dense_by_hand(adapter, 0.75)
    assert np.count_nonzero(dense) == adapter.sparse_values.numel()
    torch.testing.assert_close(adapter.delta_weight().double(), torch.from_numpy(dense))
    reference = copy.deepcopy(pristine)
    with torch.no_grad():
        reference[0].weight += _canonical(layer_name, torch.from_numpy(dense).float())
        torch.testing.assert_close(model(x), reference(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer_name", ["linear", "gpt2_conv1d", "conv2d_grouped"])
def test_value_gradient_is_the_dense_gradient_at_the_mask(layer_name):
    model, pristine, x = _build(layer_name, r=1, alpha=0.5)
    _randomize(model)
    adapter = _adapter(model)
    target = torch.randn_like(pristine(x))
    ((model(x) - target) ** 2).sum().backward()
    # dense fine-tuning of W0 + ΔW: ∂L/∂W at the same point
    dense = copy.deepcopy(pristine)
    with torch.no_grad():
        dense[0].weight += _canonical(layer_name, adapter.delta_weight())
    ((dense(x) - target) ** 2).sum().backward()
    grad_canonical = _canonical(layer_name, dense[0].weight.grad).reshape(-1)
    expected = 0.5 * grad_canonical[adapter.sparse_indices.long()]
    torch.testing.assert_close(adapter.sparse_values.grad, expected, rtol=1e-5, atol=1e-6)
    assert model.model[0].base_layer.weight.grad is None


def test_input_dropout_runs_the_increment_on_the_dropped_input():
    model, pristine, x = _build("linear", r=1, dropout=0.5)
    _randomize(model)
    delta = _adapter(model).delta_weight().detach()
    model.train()
    torch.manual_seed(5)
    out = model(x)
    torch.manual_seed(5)
    expected = pristine(x) + F.linear(F.dropout(x, 0.5, training=True), delta)
    torch.testing.assert_close(out, expected)
    model.eval()
    torch.testing.assert_close(model(x), pristine(x) + F.linear(x, delta))


def test_bf16_base_keeps_fp32_values_and_int32_indices_and_merges():
    model, pristine, x = _build("linear", r=1)
    _randomize(model)
    model.to(torch.bfloat16)
    adapter = _adapter(model)
    assert adapter.sparse_values.dtype == torch.float32 and adapter.sparse_indices.dtype == torch.int32
    out = model(x.bfloat16())
    assert out.dtype == torch.bfloat16
    expected = model.model[0].base_layer.weight + adapter.delta_weight().to(torch.bfloat16)
    model.merge_adapter()
    assert torch.equal(model.model[0].base_layer.weight, expected)


# =============================================================================== budgets and errors
def test_budget_from_r_density_and_budget_pattern():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6), nn.Conv2d(3, 4, 3))
    model = lp.adapt(copy.deepcopy(base), ShiraConfig(r=2, target_modules=["0", "1"], rank_pattern={"1": 1}))
    assert _adapter(model, path="0").sparse_values.numel() == 2 * (6 + 8)
    assert _adapter(model, path="1").sparse_values.numel() == 1 * (4 + 3 * 9)
    assert model.get_nb_trainable_parameters()[0] == 28 + 31
    model = lp.adapt(copy.deepcopy(base), ShiraConfig(density=0.1, target_modules=["0", "1"], budget_pattern={"1": 5}))
    assert _adapter(model, path="0").sparse_values.numel() == round(0.1 * 48)
    assert _adapter(model, path="1").sparse_values.numel() == 5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=4), r"56 entries .* only 48; lower r to at most 3"),  # r=3: 42 entries fit
        (dict(density=0.001), "keeps no entry"),
        (dict(density=1.5), r"density must be a fraction in \(0, 1\]"),
        (dict(budget_pattern={"0": 49}), "budget_pattern gives 49"),
        (dict(r=1, mask_slot=4), "mask_slot=4 .* needs 70 entries"),
        (dict(mask_type="topk"), "mask_type='topk' is unknown"),
        (dict(use_rslora=True), "drop use_rslora"),
        (dict(mask_type="snip"), r"with_masks\(model, config, batches=..., loss_fn=...\)"),
        (dict(mask_type="weight_magnitude"), r"needs the model's weight"),
        (dict(r=1, masks={"0": torch.tensor([3, 1, 2])}), "not strictly increasing"),
        (dict(r=1, masks={"0": torch.arange(5)}), r"selects 5 entries but the budget of 0 is 14; set budget_pattern"),
        (dict(r=1, masks={"0": torch.rand(8, 6)}), r"canonical layout \(6, 8\)"),
    ],
)
def test_bad_configs_raise_clear_errors_and_leave_the_model_unchanged(kwargs, match):
    torch.manual_seed(0)
    model = lp.AdaptedModel(nn.Sequential(nn.Linear(8, 6)))
    model.add_adapter("ok", ShiraConfig(r=3, target_modules=["0"]))
    before = copy.deepcopy(model.model)
    with pytest.raises(lp.LavaConfigError, match=match):
        model.add_adapter("new", ShiraConfig(target_modules=["0"], **{"r": 1, **kwargs}))
    assert list(model.peft_config) == ["ok"]
    assert str(model.model) == str(before)


# =============================================================================== mask builders
def test_random_mask_is_seeded_and_equals_peft_random_mask():
    from peft.tuners.shira.mask_functions import random_mask

    layer = nn.Linear(9, 7)
    inputs = sm.MaskInputs((7, 9), budget=3 * 16, seed=11)
    ours = sm.select_top(sm.mask_builder("random").scores(inputs), inputs.budget)
    peft_mask = random_mask(layer, 3, random_seed=11)  # (out, in) = canonical, 0/1
    assert torch.equal(ours, torch.nonzero(peft_mask.reshape(-1)).flatten())
    again = sm.select_top(sm.random_scores(inputs), inputs.budget)
    other = sm.select_top(sm.random_scores(sm.MaskInputs((7, 9), 48, seed=12)), 48)
    assert torch.equal(ours, again) and not torch.equal(ours, other)


def test_struct_mask_is_the_diagonal_plus_every_fth_row_by_hand():
    # O=6, F=4: diagonal 0,5,10,15; budget 10 leaves 6 → 2 rows, stride 6//2=3 → rows 0 and 3
    got = sm.select_top(sm.struct_scores(sm.MaskInputs((6, 4), budget=10)), 10)
    assert got.tolist() == [0, 1, 2, 3, 5, 10, 12, 13, 14, 15]
    # budget 8 leaves 4 → 1 row (row 0: 3 new entries) → the last one is the next free index, 4
    got = sm.select_top(sm.struct_scores(sm.MaskInputs((6, 4), budget=8)), 8)
    assert got.tolist() == [0, 1, 2, 3, 4, 5, 10, 15]
    # conv (O=2, I=1, K=2x2): flattening 2 x 4; budget 2 is just the diagonal (0,0), (1,1)
    got = sm.select_top(sm.struct_scores(sm.MaskInputs((2, 1, 2, 2), budget=2)), 2)
    assert got.tolist() == [0, 5]


def test_selection_ties_go_to_the_lower_index_and_slots_are_successive_budgets():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, 2.0, 2.0, 0.0])
    assert sm.select_top(scores, 2).tolist() == [1, 2]
    assert sm.select_top(scores, 2, slot=1).tolist() == [4, 5]
    assert sm.select_top(scores, 2, slot=2).tolist() == [0, 6]
    # against NumPy: stable descending order, slot k = order[k·b:(k+1)·b]
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (6, 7), generator=gen).float()
    order = np.argsort(-scores.numpy().reshape(-1), kind="stable")
    for slot in range(4):
        assert sm.select_top(scores, 9, slot).tolist() == sorted(order[slot * 9:(slot + 1) * 9].tolist())
    parts = sm.non_overlapping_masks(scores, [5, 9, 3])
    assert [p.tolist() for p in parts] == [sorted(order[a:b].tolist()) for a, b in ((0, 5), (5, 14), (14, 17))]


def test_non_overlapping_slots_give_disjoint_adapters_and_awor_by_hand():
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Linear(10, 6)), ShiraConfig(r=1, target_modules=["0"]), "a")
    model.add_adapter("b", ShiraConfig(r=1, target_modules=["0"], mask_slot=1))
    a, b = _adapter(model, "a"), _adapter(model, "b")
    assert not set(a.sparse_indices.tolist()) & set(b.sparse_indices.tolist())
    _randomize(model)
    da, db = (x.delta_weight().detach().double().numpy() for x in (a, b))
    m = da @ db.T  # O x O ("auto": O=6 < F=10)
    result = diagnostics.adapter_overlap(model, "a", "b")["per_layer"]["0"]
    assert result["awom"] == pytest.approx(np.linalg.norm(m, 2), rel=1e-9)
    assert result["awor"] == pytest.approx(1 - np.count_nonzero(m) / m.size)


def test_register_a_custom_mask(monkeypatch):
    monkeypatch.setattr(sm, "_MASKS", dict(sm._MASKS))  # the registration ends with the test
    sm.register_mask("last_entries", lambda inputs: torch.arange(inputs.numel).view(inputs.shape))
    model, _, _ = _build("linear", r=1, mask_type="last_entries")
    assert _adapter(model).sparse_indices.tolist() == list(range(35 - 12, 35))
    with pytest.raises(lp.LavaConfigError, match="needs may only contain"):
        sm.register_mask("bad", lambda i: i, needs=("activations",))


# =============================================================================== calibration
def _calibration_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 4, generator=gen), torch.randn(5, 3, generator=gen)) for _ in range(2)]

    def loss_fn(m, batch):  # L = Σ_n t_n · (W x_n)  ⇒  ∂L/∂W = tᵀ x
        return (m[0](batch[0]) * batch[1]).sum()

    by_hand = sum(np.abs(t.numpy().T @ x.numpy()) for x, t in batches)
    return model, batches, loss_fn, by_hand


def test_calibration_gradients_by_hand_and_state_restored():
    model, batches, loss_fn, by_hand = _calibration_setup()
    model[1].weight.grad = torch.ones_like(model[1].weight)  # an existing gradient stays as it is
    flags = [p.requires_grad for p in model.parameters()]
    grads = sm_tools.calibration_gradients(model, batches, loss_fn, ["0"])
    torch.testing.assert_close(grads["0"], torch.from_numpy(by_hand).float())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model[0].weight.grad is None and torch.equal(model[1].weight.grad, torch.ones(2, 3))

    model[0].weight.requires_grad_(False)

    def failing(m, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sm_tools.calibration_gradients(model, batches, failing, ["0"])
    assert [p.requires_grad for p in model.parameters()] == [False, True, True]
    with pytest.raises(lp.LavaConfigError, match="at least one batch"):
        sm_tools.calibration_gradients(model, [], loss_fn, ["0"])
    with pytest.raises(lp.LavaError, match="does not depend on"):
        sm_tools.calibration_gradients(model, batches, loss_fn, ["1"])


@pytest.mark.parametrize("mask_type", ["weight_magnitude", "grad", "snip"])
def test_data_masks_via_with_masks_match_numpy_top_k(mask_type):
    model, batches, loss_fn, grad = _calibration_setup()
    weight = model[0].weight.detach().numpy().astype(np.float64)
    score = {"weight_magnitude": np.abs(weight), "grad": grad, "snip": np.abs(weight) * grad}[mask_type]
    cfg = with_masks(model, ShiraConfig(r=1, target_modules=["0"], mask_type=mask_type), batches, loss_fn)
    budget = 1 * (3 + 4)
    expected = sorted(np.argsort(-score.reshape(-1), kind="stable")[:budget].tolist())
    assert cfg.masks["0"].tolist() == expected
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # calibration left no trace
    adapted = lp.adapt(model, cfg)
    assert _adapter(adapted).sparse_indices.tolist() == expected


def test_weight_magnitude_on_a_transposed_layer_uses_the_canonical_layout():
    torch.manual_seed(0)
    base = nn.Sequential(GPT2Conv1D(5, 7))  # weight (in=7, out=5)
    cfg = with_masks(base, ShiraConfig(r=1, target_modules=["0"], mask_type="weight_magnitude"))
    canonical = base[0].weight.detach().T.numpy()
    assert cfg.masks["0"].tolist() == sorted(np.argsort(-np.abs(canonical).reshape(-1), kind="stable")[:12].tolist())
    model = lp.adapt(base, ShiraConfig(r=1, target_modules=["0"]))  # an adapted model: its base weights are read
    again = with_masks(model, ShiraConfig(r=1, target_modules=["0"], mask_type="weight_magnitude"))
    assert torch.equal(again.masks["0"], cfg.masks["0"])


def test_grad_masks_need_calibration_data():
    model, *_ = _calibration_setup()
    with pytest.raises(lp.LavaConfigError, match="batches=<iterable of batches>"):
        with_masks(model, ShiraConfig(r=1, target_modules=["0"], mask_type="grad"))


# =============================================================================== files
def test_save_load_is_exact_including_indices(tmp_path):
    model, pristine, x = _build("gpt2_conv1d", r=1, mask_type="weight_magnitude",
                                masks={"0": torch.rand(5, 7)})  # precomputed scores
    _randomize(model)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    adapter = _adapter(model)
    assert sorted(saved) == ["0.sparse_indices", "0.sparse_values"]
    assert saved["0.sparse_indices"].dtype == torch.int32
    assert torch.equal(saved["0.sparse_indices"], adapter.sparse_indices)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["config"]["masks"] == SAVED_MASKS
    loaded = lp.AdaptedModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    assert torch.equal(_adapter(loaded).sparse_indices, adapter.sparse_indices)
    assert torch.equal(_adapter(loaded).sparse_values, adapter.sparse_values)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # a config read from a file describes the file: reusing it for a new adapter without a file is refused at use
    reused = lp.adapt(copy.deepcopy(pristine), loaded.peft_config["default"])
    with pytest.raises(lp.LavaError, match="indices were never loaded"):
        reused(x)


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda i: i.flip(0), "not strictly increasing"),
        (lambda i: torch.cat([i[:1], i[:-1]]), "not strictly increasing"),
        (lambda i: torch.cat([i[:-1], torch.tensor([35], dtype=i.dtype)]), r"outside \[0, 35\)"),
        (lambda i: i.float(), "not an integer type"),
        (lambda i: i[:-1], "does not match its config"),
    ],
)
def test_corrupt_index_buffer_in_a_file_is_refused(tmp_path, corrupt, match):
    model, pristine, _ = _build("linear", r=1, alpha=2.0)  # α ≠ 1: our key layout (PEFT's SHiRA has no scale)
    model.save_pretrained(tmp_path)
    drop_manifest(tmp_path)  # a hand-edited folder: the index checks themselves must refuse it
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["0.sparse_indices"] = corrupt(tensors["0.sparse_indices"])
    save_file(tensors, str(path))
    fresh = lp.AdaptedModel(copy.deepcopy(pristine))
    with pytest.raises(lp.AdapterFileError, match=match):
        fresh.load_adapter(str(tmp_path), "x")
    assert fresh.peft_config == {} and isinstance(fresh.model[0], nn.Linear)


def test_hotswap_replaces_values_and_indices_in_place(tmp_path):
    model, pristine, x = _build("linear", r=1, seed=0)
    other, _, _ = _build("linear", r=1, seed=0, mask_slot=1)
    _randomize(other, seed=3)
    other.save_pretrained(tmp_path)
    lp.hotswap_adapter(model, str(tmp_path), "default")
    assert torch.equal(_adapter(model).sparse_indices, _adapter(other).sparse_indices)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))


# =============================================================================== merge / switch
@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("exact", [False, True])
def test_scatter_merge_equals_dense_and_never_forms_delta_weight(layer_name, exact, monkeypatch):
    model, pristine, x = _build(layer_name, r=1, alpha=1.5)
    model.add_adapter("b", ShiraConfig(r=1, alpha=0.5, target_modules=["0"], mask_slot=1, seed=1))
    _randomize(model)
    model.exact_unmerge = exact
    layer = model.model[0]
    w0 = layer.base_weight.detach().clone()
    deltas = {n: layer.ops.to_base_layout(layer.adapters[n].delta_weight().detach()) for n in ("default", "b")}
    with torch.no_grad():
        out_a = model(x)
        model.set_adapter("b")
        out_b = model(x)
        model.set_adapter("default")

    def no_dense(self):
        raise AssertionError("delta_weight() called: the merge formed a dense ΔW")

    monkeypatch.setattr(ShiraAdapter, "delta_weight", no_dense)
    ptr = layer.base_weight.data_ptr()
    model.merge_adapter()
    assert torch.equal(layer.base_weight, w0 + deltas["default"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), out_a, rtol=1e-6, atol=1e-6)
    model.set_adapter("b")  # merged switch: in place
    assert layer.merged_adapters == ["b"] and layer.base_weight.data_ptr() == ptr
    torch.testing.assert_close(layer.base_weight, w0 + deltas["b"], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out_b, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    outside = deltas["default"].eq(0) & deltas["b"].eq(0)
    assert torch.equal(layer.base_weight[outside], w0[outside])  # never touched
    if exact:
        assert torch.equal(layer.base_weight, w0)
    else:
        torch.testing.assert_close(layer.base_weight, w0, rtol=0, atol=1e-6)


def test_merge_refuses_non_finite_values_before_touching_weights():
    model, _, _ = _build("linear", r=1)
    with torch.no_grad():
        _adapter(model).sparse_values[3] = float("nan")
    w0 = model.model[0].base_weight.clone()
    with pytest.raises(lp.LavaError, match="non-finite"):
        model.merge_adapter()
    assert torch.equal(model.model[0].base_weight, w0)


def test_mixed_batch_matches_separate_runs():
    model, pristine, x = _build("conv2d_grouped", r=1)
    model.add_adapter("b", ShiraConfig(r=1, target_modules=["0"], mask_type="struct"))
    _randomize(model)
    with torch.no_grad():
        ref_a = model(x)
        model.set_adapter("b")
        ref_b = model(x)
        mixed = model(x, adapter_names=["default", "b"])
    torch.testing.assert_close(mixed, torch.cat([ref_a[:1], ref_b[1:]]))


# =============================================================================== combination
def test_linear_combination_is_sparse_on_the_union_of_supports(tmp_path):
    model, pristine, x = _build("gpt2_conv1d", r=1, alpha=2.0)
    model.add_adapter("b", ShiraConfig(r=1, alpha=0.5, target_modules=["0"], mask_type="struct"))
    model.add_adapter("c", lp.LoraConfig(r=1, target_modules=["0"]))
    _randomize(model)
    a, b = _adapter(model), _adapter(model, "b")
    report = model.add_weighted_adapter(["default", "b"], [0.7, -1.3], "mix")
    mix = _adapter(model, "mix")
    assert report.method == "shira" and type(mix) is ShiraAdapter
    union = sorted(set(a.sparse_indices.tolist()) | set(b.sparse_indices.tolist()))
    assert mix.sparse_indices.tolist() == union and report.ranks["0"] == len(union)
    expected = 0.7 * _dense_by_hand(a, 2.0) - 1.3 * _dense_by_hand(b, 0.5)
    torch.testing.assert_close(mix.delta_weight().double(), torch.from_numpy(expected), rtol=1e-6, atol=1e-7)
    assert report.relative_error["0"] < 1e-7
    model.set_adapter("mix")
    model.save_pretrained(tmp_path, adapter_name="mix")
    loaded = lp.AdaptedModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # SHiRA + LoRA: no common sparse form, the dense fallback still gives the exact sum
    report = model.add_weighted_adapter(["default", "c"], [1.0, 1.0], "dense")
    assert report.method == "dense_delta"


def test_linear_combination_also_combines_modules_to_save():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    head = base[1].weight.detach().clone()
    model = lp.adapt(base, ShiraConfig(r=1, target_modules=["0"], modules_to_save=["1"]), "a")
    model.add_adapter("b", ShiraConfig(r=1, target_modules=["0"], modules_to_save=["1"], seed=1))
    with torch.no_grad():
        for name, shift in (("a", 1.0), ("b", 3.0)):
            model.model[1].copies[name].weight.add_(shift)
    model.add_weighted_adapter(["a", "b"], [0.5, 2.0], "mix")
    torch.testing.assert_close(model.model[1].copies["mix"].weight, head + 0.5 * 1.0 + 2.0 * 3.0)
    assert model.peft_config["mix"].modules_to_save == ["1"]


# =============================================================================== diagnostics
def test_sizes_and_merged_change_fraction_count_the_budget():
    model, _, _ = _build("conv2d_grouped", r=1)
    _randomize(model)
    budget = 1 * (6 + 2 * 9)
    sizes = diagnostics.adapter_sizes(model)["default"]
    assert sizes["params"] == budget and sizes["stored_bytes"] == budget * (4 + 4)  # fp32 values + int32 indices
    change = diagnostics.merged_change_fraction(model)
    assert change["changed"] == budget and change["adapted_weights"] == 6 * 2 * 9
    assert change["percent_of_adapted"] == pytest.approx(100 * budget / 108)


# =============================================================================== HF PEFT
def test_export_to_hf_peft_shira_gives_the_same_outputs(tmp_path):
    from peft import PeftModel

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Conv1d(4, 2, 1))

    model = lp.adapt(net(), ShiraConfig(r=1, alpha=0.5, target_modules=["0", "2"], mask_type="struct"))
    _randomize(model)
    x = torch.randn(3, 4, 6)
    lp.export_peft(model, str(tmp_path / "peft"))  # dispatches to the SHiRA format
    peft_model = PeftModel.from_pretrained(net(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), model(x), rtol=1e-6, atol=1e-6)
    for path in ("0", "2"):
        ours = model.model.get_submodule(path)
        peft_layer = peft_model.base_model.model.get_submodule(path)
        torch.testing.assert_close(peft_layer.get_delta_weight("default").to_dense(),
                                   ours.adapters["default"].delta_weight())
    conv = lp.adapt(net(), ShiraConfig(r=1, target_modules=["4"]))
    with pytest.raises(lp.LavaConfigError, match="PEFT SHiRA adapts nn.Linear only"):
        export_peft_shira(conv, str(tmp_path / "conv"))
    assert not (tmp_path / "conv").exists()


# =============================================================================== real model
def test_minilm_shira_snip_on_query_value_trains_and_changes_only_the_budget():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lava_peft.train.tasks import minilm_path

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    pristine = {n: p.detach().clone() for n, p in base.named_parameters()}
    batch = tok(["a gripping, beautifully acted film", "a tedious, lifeless mess", "warm and funny",
                 "i want my two hours back"], return_tensors="pt", padding=True)
    labels = torch.tensor([1, 0, 1, 0])

    def loss_fn(model, b):
        return model(**b, labels=labels).loss

    cfg = with_masks(base, ShiraConfig(r=2, target_modules=["query", "value"], mask_type="snip",
                                       modules_to_save=["classifier"]), [batch], loss_fn)
    assert all(p.requires_grad and p.grad is None for p in base.parameters())  # calibration left no trace
    model = lp.adapt(base, cfg)
    layers = model.adapter_layers()
    assert len(layers) == 12
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    model.merge_adapter()
    budget = 2 * (384 + 384)
    for path, adapter in layers:
        weight = model.model.get_submodule(path).base_weight
        changed = torch.nonzero((weight != pristine[f"{path}.weight"]).reshape(-1)).flatten()
        assert set(changed.tolist()) <= set(adapter.sparse_indices.tolist())
        assert 0.95 * budget <= changed.numel() <= budget


def test_import_of_a_peft_trained_shira_adapter_gives_the_same_outputs(tmp_path):
    """An adapter written by the real HF PEFT (random mask, trained values) loads as our SHiRA adapter."""
    from peft import PeftModel, get_peft_model
    from peft import ShiraConfig as PeftShiraConfig

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))

    peft_model = get_peft_model(net(), PeftShiraConfig(r=1, target_modules=["0", "2"], random_seed=3))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "shira_weight" in name:
                p.copy_(torch.randn(p.shape) * 0.5)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    peft_model = PeftModel.from_pretrained(net(), str(tmp_path / "peft")).eval()
    ours = lp.import_peft(net(), str(tmp_path / "peft"))
    assert ours.peft_config["default"].method == "shira"
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-6, atol=1e-6)
    # our export of the imported adapter gives PEFT the same adapter back
    lp.export_peft(ours, str(tmp_path / "again"))
    again = PeftModel.from_pretrained(net(), str(tmp_path / "again")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), peft_model(x), rtol=1e-6, atol=1e-6)
    # a repeated (row, column) pair is refused and the model is left as it was
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("shira_indices"))
    tensors[key][:, 1] = tensors[key][:, 0]
    save_file(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"))
    fresh = net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(lp.AdapterFileError, match="repeated"):
        lp.import_peft(fresh, str(tmp_path / "peft"))
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
