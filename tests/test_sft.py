"""LT-SFT (lottery-ticket sparse fine-tuning), against independent computations.

The contract (merge/disable/save/grad on every layer type) runs for SFT in
test_contract.py; the sparse-delta machinery itself in test_shira.py.  Here: the
weight-change mask (NumPy top-k of |θ1 − θ0|, per layer and global), the exact
restoration after phase 1 (also when it raises), phase-2 gradients, the L1 term,
composition by addition, files, errors, and an LT-SFT of real MiniLM.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lava_peft as lp
from lava_peft.inject import adapted_layers
from lava_peft.layers import AdaptedLayer
from lava_peft.methods import sparse_masks as sm
from lava_peft.tools import sparse_masks as sm_tools
from lava_peft.methods.sft import SftAdapter, SftConfig
from lava_peft.tools.sft import lottery_ticket_masks, trainer_phase
from test_contract import GPT2Conv1D


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


TARGETS = ["0", "3"]  # a Linear (canonical = stored) and a GPT-2 Conv1D (canonical = stored transposed)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Tanh(), GPT2Conv1D(4, 6))


def _data(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)


def _sgd_steps(model, steps=3, lr=0.2):
    """A deterministic phase 1: SGD on every parameter that requires grad."""
    x, y = _data()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _canonical(path, weight):
    w = weight.detach().numpy()
    return w.T if path == "3" else w


def _numpy_top(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest scores, ties to the lower index, sorted."""
    order = np.lexsort((np.arange(scores.size), -scores))
    return sorted(order[:k].tolist())


def _changes_by_hand(net, targets=TARGETS, steps=3):
    """θ1 − θ0 (canonical, flat, float64) of a copy trained with only the targeted weights trainable."""
    trained = copy.deepcopy(net)
    for p in trained.parameters():
        p.requires_grad_(False)
    for path in targets:
        trained.get_submodule(path).weight.requires_grad_(True)
    _sgd_steps(trained, steps)
    return {path: (_canonical(path, trained.get_submodule(path).weight).astype(np.float64)
                   - _canonical(path, net.get_submodule(path).weight)).reshape(-1) for path in targets}


def _state(model):
    """Everything phase 1 must put back, as copies."""
    return {
        "params": {n: (p, p.detach().clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
    }


def _assert_same_state(model, before):
    now = dict(model.named_parameters())
    assert set(now) == set(before["params"])
    for name, (obj, value, flag, grad) in before["params"].items():
        p = now[name]
        assert p is obj, f"{name} is another tensor object"
        assert torch.equal(p, value), f"{name} changed"
        assert p.requires_grad == flag, f"{name}.requires_grad changed"
        assert p.grad is grad, f"{name}.grad changed"
    for name, value in before["buffers"].items():
        assert torch.equal(dict(model.named_buffers())[name], value), f"buffer {name} changed"
    assert {n: m.training for n, m in model.named_modules()} == before["modes"]


# =============================================================================== the weight-change mask
def test_weight_change_builder_is_the_absolute_change_and_says_how_to_get_it():
    change = torch.randn(3, 4)
    builder = sm.mask_builder("weight_change")
    assert builder.needs == ("weight_change",)
    assert torch.equal(builder.scores(sm.MaskInputs((3, 4), 5, weight_change=change)), change.abs())
    with pytest.raises(lp.LavaConfigError, match="lottery_ticket_masks"):
        builder.scores(sm.MaskInputs((3, 4), 5))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_lottery_ticket_mask_is_numpy_top_k_of_the_weight_change(scope):
    net = _net()
    expected_changes = _changes_by_hand(net)
    cfg = SftConfig(target_modules=TARGETS, density=0.25)
    masks = lottery_ticket_masks(net, cfg, _sgd_steps, scope=scope)
    budgets = {"0": round(0.25 * 48), "3": round(0.25 * 24)}
    if scope == "layer":
        expected = {p: _numpy_top(np.abs(expected_changes[p]), budgets[p]) for p in TARGETS}
    else:
        flat = np.concatenate([np.abs(expected_changes[p]) for p in TARGETS])
        top = np.array(_numpy_top(flat, sum(budgets.values())))
        expected = {"0": top[top < 48].tolist(), "3": (top[top >= 48] - 48).tolist()}
        assert len(expected["0"]) != budgets["0"]  # the global split really differs from the per-layer one
    assert {p: m.tolist() for p, m in masks.items()} == expected
    assert all(m.dtype == torch.int64 for m in masks.values())
    model = lp.adapt(net, cfg.replace(masks=masks))
    for path, adapter in model.adapter_layers():
        assert isinstance(adapter, SftAdapter)
        assert adapter.sparse_indices.tolist() == expected[path]


def test_phase_one_trains_only_the_targets_and_heads_and_leaves_the_model_bit_identical():
    net = _net()
    net[1].weight.requires_grad_(False)  # an arbitrary starting state that must come back
    net[0].bias.grad = torch.full((6,), 0.5)
    net.eval()
    net[2].train()
    before = _state(net)
    bias_grad = net[0].bias.grad
    seen = {}

    def train_fn(model):
        seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        seen["grads"] = [n for n, p in model.named_parameters() if p.grad is not None]
        model[1].weight.requires_grad_(True)  # a train_fn may unfreeze more; it is undone too
        model[3].bias = nn.Parameter(torch.zeros(4))  # ... and even replace a parameter
        _sgd_steps(model)  # train mode: the BatchNorm statistics move as well

    lottery_ticket_masks(net, SftConfig(target_modules=TARGETS, density=0.25, modules_to_save=["1"]), train_fn)
    assert seen["trainable"] == {"0.weight", "3.weight", "1.weight", "1.bias"}  # targets + modules_to_save
    assert seen["grads"] == []
    _assert_same_state(net, before)
    assert net[0].bias.grad is bias_grad


def test_phase_one_restores_everything_when_train_fn_raises():
    net = _net()
    before = _state(net)

    def train_fn(model):
        model[1].weight.requires_grad_(True)
        _sgd_steps(model)
        raise RuntimeError("boom in phase 1")

    with pytest.raises(RuntimeError, match="boom in phase 1"):
        lottery_ticket_masks(net, SftConfig(target_modules=TARGETS, density=0.25), train_fn)
    _assert_same_state(net, before)
    assert all(p.grad is None for p in net.parameters())


def test_phase_one_on_an_adapted_model_trains_base_weights_under_the_active_language_sft():
    net = _net()
    lang_masks = {"0": torch.tensor([0, 5, 9, 40]), "3": torch.tensor([1, 2, 23])}
    model = lp.adapt(net, SftConfig(target_modules=TARGETS, masks=lang_masks), "language")
    with torch.no_grad():
        for _, a in model.adapter_layers():
            a.sparse_values.normal_()
    before = _state(model)
    # by hand: the base weights (only) trained with the language SFT in the forward
    copy_ = copy.deepcopy(model)
    for p in copy_.parameters():
        p.requires_grad_(False)
    for path in TARGETS:
        copy_.model.get_submodule(path).base_weight.requires_grad_(True)
    _sgd_steps(copy_)
    changes = {path: (_canonical(path, copy_.model.get_submodule(path).base_weight).astype(np.float64)
                      - _canonical(path, model.model.get_submodule(path).base_weight)).reshape(-1)
               for path in TARGETS}
    masks = lottery_ticket_masks(model, SftConfig(target_modules=TARGETS, density=0.25), _sgd_steps, scope="layer")
    _assert_same_state(model, before)  # language values, base weights, flags: all as before
    assert masks["0"].tolist() == _numpy_top(np.abs(changes["0"]), 12)
    assert masks["3"].tolist() == _numpy_top(np.abs(changes["3"]), 6)


# =============================================================================== phase 2
def _adapted(masks, name="default", **cfg):
    net = _net()
    pristine = copy.deepcopy(net)
    model = lp.adapt(net, SftConfig(target_modules=TARGETS, masks=masks, **cfg), name)
    return model, pristine


MASKS = {"0": torch.tensor([0, 3, 7, 8, 20, 47]), "3": torch.tensor([2, 5, 11, 12, 23])}


def _dense(adapter, path, shape):
    """α·v scattered densely (canonical, float64), by NumPy."""
    out = np.zeros(int(np.prod(shape)))
    out[adapter.sparse_indices.numpy()] = adapter.scale * adapter.sparse_values.detach().double().numpy()
    return out.reshape(shape)


def _with_weights(pristine, deltas):
    """A copy of the base net whose targeted weights are W0 + Σ deltas (canonical numpy) — the dense reference."""
    ref = copy.deepcopy(pristine)
    with torch.no_grad():
        for path, delta in deltas.items():
            w = ref.get_submodule(path).weight
            d = delta.T if path == "3" else delta
            w.copy_(torch.from_numpy(w.detach().double().numpy() + d))
    return ref


def test_phase_two_gradients_are_the_dense_gradient_at_the_mask_and_nothing_else_moves():
    model, pristine = _adapted(MASKS, alpha=0.5)
    with torch.no_grad():
        for _, a in model.adapter_layers():
            a.sparse_values.normal_()
    layers = dict(model.adapter_layers())
    x, y = _data()
    model.eval()
    F.cross_entropy(model(x), y).backward()
    ref = _with_weights(pristine, {p: _dense(a, p, a.spec.canonical_shape) for p, a in layers.items()})
    ref.eval()
    F.cross_entropy(ref(x), y).backward()
    for path, adapter in layers.items():
        dense_grad = _canonical(path, ref.get_submodule(path).weight.grad).reshape(-1)
        expected = 0.5 * dense_grad[adapter.sparse_indices.numpy()]
        np.testing.assert_allclose(adapter.sparse_values.grad.numpy(), expected, rtol=1e-5, atol=1e-7)
        assert model.model.get_submodule(path).base_weight.grad is None
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"model.{p}.adapters.default.sparse_values" for p in TARGETS}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.merge_adapter()
    for path, adapter in layers.items():
        now = _canonical(path, model.model.get_submodule(path).base_weight).reshape(-1)
        changed = np.nonzero(now != _canonical(path, pristine.get_submodule(path).weight).reshape(-1))[0]
        assert set(changed.tolist()) <= set(adapter.sparse_indices.tolist()) and changed.size > 0


def test_l1_term_and_its_gradient_by_hand():
    model, _ = _adapted(MASKS, alpha=0.5, l1_lambda=0.3)
    layers = dict(model.adapter_layers())
    with torch.no_grad():
        for a in layers.values():
            a.sparse_values.normal_()
            a.sparse_values[1] = 0.0  # |·| has gradient 0 at 0
    v = {p: a.sparse_values.detach().double().numpy() for p, a in layers.items()}
    by_hand = 0.3 * np.mean([np.abs(0.5 * v[p]).sum() for p in TARGETS])  # λ · mean over layers of ‖φ‖₁
    for path, adapter in layers.items():
        assert adapter.regularization().item() == pytest.approx(np.abs(0.5 * v[path]).sum(), rel=1e-6)
    reg = model.regularization_loss()
    assert reg.item() == pytest.approx(by_hand, rel=1e-6)
    reg.backward()
    for path, adapter in layers.items():
        # ∂/∂φ = (λ/L)·sign(φ), and φ = α·v
        grad_phi = adapter.sparse_values.grad.double().numpy() / 0.5
        np.testing.assert_allclose(grad_phi, 0.3 / 2 * np.sign(v[path]), rtol=1e-6)
        assert adapter.sparse_values.grad[1] == 0
    off, _ = _adapted(MASKS)
    with torch.no_grad():
        for _, a in off.adapter_layers():
            a.sparse_values.normal_()
    assert off.regularization_loss().item() == 0.0 and not off.regularization_loss().requires_grad


# =============================================================================== composition
def test_language_plus_task_composes_by_addition(tmp_path):
    lang = {"0": torch.tensor([0, 3, 7, 8, 20, 47]), "3": torch.tensor([2, 5, 11, 12, 23])}
    task = {"0": torch.tensor([3, 4, 8, 30]), "3": torch.tensor([0, 5, 23])}  # overlaps lang
    model, pristine = _adapted(lang, "language", l1_lambda=0.1)
    model.add_adapter("task", SftConfig(target_modules=TARGETS, masks=task, alpha=2.0))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in adapted_layers(model.model):
            for a in layer.adapters.values():
                a.sparse_values.copy_(torch.randn(a.sparse_values.shape, generator=gen))
    phis = {path: {name: _dense(a, path, a.spec.canonical_shape) for name, a in layer.adapters.items()}
            for path, layer in adapted_layers(model.model)}
    summed = {path: d["language"] + d["task"] for path, d in phis.items()}
    ref = _with_weights(pristine, summed).eval()
    model.eval()
    x, _ = _data()

    report = model.add_weighted_adapter(["language", "task"], [1.0, 1.0], "both", combination_type="linear")
    assert report.method == "sft" and isinstance(model.peft_config["both"], SftConfig)
    for path, layer in adapted_layers(model.model):
        both = layer.adapters["both"]
        assert type(both) is SftAdapter
        union = sorted(set(lang[path].tolist()) | set(task[path].tolist()))
        assert both.sparse_indices.tolist() == union
        np.testing.assert_allclose(both.delta_weight().double().numpy(), summed[path], rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        expected = ref(x)
        model.set_adapter("both")
        combined = model(x)
        model.set_adapter(["language", "task"])  # both active at once: W0 + φ_lang + φ_task
        together = model(x)
        torch.testing.assert_close(combined, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together, expected, rtol=1e-5, atol=1e-6)
        model.merge_adapter()  # merging both gives θ0 + φ_lang + φ_task
        for path in TARGETS:
            merged = _canonical(path, model.model.get_submodule(path).base_weight)
            np.testing.assert_allclose(merged, _canonical(path, ref.get_submodule(path).weight), rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
        model.unmerge_adapter()
    model.save_pretrained(tmp_path, adapter_name="both")
    loaded = lp.AdaptedModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    model.set_adapter("both")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# =============================================================================== files
def test_save_load_is_exact_with_global_masks_whose_sizes_set_the_budgets(tmp_path):
    net = _net()
    pristine = copy.deepcopy(net)
    cfg = SftConfig(target_modules=TARGETS, density=0.25, l1_lambda=0.05)
    masks = lottery_ticket_masks(net, cfg, _sgd_steps, scope="global")
    sizes = {p: m.numel() for p, m in masks.items()}
    assert sizes != {"0": 12, "3": 6}  # not the per-layer density budgets
    model = lp.adapt(net, cfg.replace(masks=masks))
    with torch.no_grad():
        for _, a in model.adapter_layers():
            a.sparse_values.normal_()
    model.eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["method"] == "sft"
    assert saved["config"]["budget_pattern"] == sizes and saved["config"]["l1_lambda"] == 0.05
    assert saved["config"]["masks"] == "saved"
    loaded = lp.AdaptedModel.from_pretrained(pristine, tmp_path)
    assert isinstance(loaded.peft_config["default"], SftConfig)
    for (path, a), (_, b) in zip(model.adapter_layers(), loaded.adapter_layers()):
        assert torch.equal(a.sparse_indices, b.sparse_indices) and a.sparse_indices.tolist() == masks[path].tolist()
        assert torch.equal(a.sparse_values, b.sparse_values)
    x, _ = _data()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.regularization_loss().item() == pytest.approx(model.regularization_loss().item())


# =============================================================================== errors
@pytest.mark.parametrize("kwargs,match", [
    ({"l1_lambda": -0.1}, "SftConfig.l1_lambda must be a finite number >= 0"),
    ({"l1_lambda": float("nan")}, "SftConfig.l1_lambda"),
    ({"use_rslora": True}, "SftConfig: LT-SFT has no rank-dependent scale"),
    ({"density": 2.0}, "SftConfig.density must be a fraction"),
    ({"masks": {"0": [1, 2]}}, "lottery_ticket_masks"),
])
def test_bad_configs_raise_clear_errors(kwargs, match):
    with pytest.raises(lp.LavaConfigError, match=match):
        SftConfig(target_modules=TARGETS, **kwargs)


def test_missing_or_unusable_masks_raise_clear_errors_and_leave_the_model_unchanged():
    net = _net()
    before = _state(net)
    with pytest.raises(lp.LavaConfigError, match=r"lottery_ticket_masks\(model, config, train_fn\)"):
        lp.adapt(net, SftConfig(target_modules=TARGETS, density=0.25))  # weight_change needs phase 1 first
    with pytest.raises(lp.LavaConfigError, match="does not read it"):
        lottery_ticket_masks(net, SftConfig(target_modules=TARGETS, mask_type="random"), _sgd_steps)
    with pytest.raises(lp.LavaConfigError, match="scope must be one of"):
        lottery_ticket_masks(net, SftConfig(target_modules=TARGETS, density=0.25), _sgd_steps, scope="model")
    with pytest.raises(lp.LavaError, match=r"phase 1 left \['3'\] unchanged"):
        lottery_ticket_masks(net, SftConfig(target_modules=TARGETS, density=0.25), lambda m: m[0].weight.data.add_(1.0))

    def lopsided(model):  # a "training" that moves layer 0 far more than layer 3
        with torch.no_grad():
            model[0].weight.add_(torch.linspace(1, 2, 48).view(6, 8))
            model[3].weight.add_(1e-3)

    with pytest.raises(lp.LavaConfigError, match=r"leaves none in \['3'\]"):
        lottery_ticket_masks(net, SftConfig(target_modules=TARGETS, density=0.25), lopsided, scope="global")
    masks = lottery_ticket_masks(net, SftConfig(target_modules=TARGETS, density=0.25), lopsided, scope="layer")
    assert masks["0"].tolist() == list(range(36, 48))  # per layer: the 12 largest additions
    with pytest.raises(lp.LavaConfigError, match="not strictly increasing"):
        lp.adapt(net, SftConfig(target_modules=TARGETS, masks={"0": torch.tensor([3, 1]), "3": torch.tensor([0])}))
    with pytest.raises(lp.LavaConfigError, match=r"bool mask has shape \(6, 8\); expected \(4, 6\)"):
        lp.adapt(net, SftConfig(target_modules=TARGETS, masks={"0": torch.ones(6, 8, dtype=torch.bool),
                                                              "3": torch.ones(6, 8, dtype=torch.bool)}))
    _assert_same_state(net, before)
    assert not any(isinstance(m, AdaptedLayer) for m in net.modules())


# =============================================================================== real model
def test_minilm_lt_sft_phase_one_mask_then_phase_two_lowers_the_loss(tmp_path):
    from lava_peft.train.tasks import load_text_data, load_text_model

    torch.manual_seed(0)  # the new classifier head
    base, tok, _ = load_text_model("minilm", num_labels=2, dropout=0.0)  # dropout 0: a deterministic forward
    base.eval()
    train, _ = load_text_data(tok, 16, 1, seed=0, max_len=32)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    cfg = SftConfig(target_modules=r"bert\.encoder\.layer\.[01]\.attention\.self\.(query|value)", density=0.01,
                    l1_lambda=1e-3, modules_to_save=["classifier"])
    phase1 = trainer_phase(train, output_dir=str(tmp_path / "phase1"), max_steps=3, batch_size=16, lr=1e-4,
                           device="cpu", progress=False, summary=False)
    masks = lottery_ticket_masks(base, cfg, phase1, scope="layer")
    assert not (tmp_path / "phase1" / "adapter").exists()  # phase 1 writes no adapter
    assert all(torch.equal(p, before[n]) and p.requires_grad and p.grad is None for n, p in base.named_parameters())
    assert not base.training
    assert len(masks) == 4 and all(m.numel() == round(0.01 * 384 * 384) for m in masks.values())

    model = lp.adapt(base, cfg.replace(masks=masks))
    batch = {k: v for k, v in train.items() if k != "labels"}

    def task_loss():
        return F.cross_entropy(model(**batch).logits, train["labels"])

    def phase_two(lr):
        """Five AdamW steps on task loss + L1; returns the task loss (eval mode) before and after."""
        model.eval()
        with torch.no_grad():
            start = task_loss().item()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        for _ in range(5):
            opt.zero_grad()
            (task_loss() + model.regularization_loss()).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            return start, task_loss().item()

    start, end = phase_two(2e-3)  # the SFT and the (dense) head, as LT-SFT trains a task
    assert end < start - 0.02
    model.merge_adapter()
    for path, adapter in model.adapter_layers():
        weight = model.model.get_submodule(path).base_weight
        changed = torch.nonzero((weight != before[f"{path}.weight"]).reshape(-1)).flatten()
        assert set(changed.tolist()) <= set(masks[path].tolist()) and changed.numel() > 0.9 * masks[path].numel()
    model.unmerge_adapter()
    # the sparse part alone (frozen random head): the lottery ticket beats a random mask of the same size
    results = {}
    for name, mask_cfg in (("ticket", {"masks": masks}), ("random", {"mask_type": "random"})):
        model.add_adapter(name, cfg.replace(modules_to_save=None, **mask_cfg))
        model.set_adapter(name)
        results[name] = phase_two(0.1)
    (start, ticket), (_, random) = results["ticket"], results["random"]
    assert ticket < start - 0.01 and ticket < random - 0.01


# =============================================================================== composable-sft's recipe
def test_default_selection_scope_is_global_as_composable_sft():
    import inspect

    assert inspect.signature(lottery_ticket_masks).parameters["scope"].default == "global"
    cfg = SftConfig(target_modules=TARGETS, density=0.25)
    default = lottery_ticket_masks(_net(), cfg, _sgd_steps)
    explicit = lottery_ticket_masks(_net(), cfg, _sgd_steps, scope="global")
    assert {p: m.tolist() for p, m in default.items()} == {p: m.tolist() for p, m in explicit.items()}


def _changes_with_l1_by_hand(net, l1, steps=3, lr=0.2):
    """Phase 1 with composable-sft's loss CE + λ·Σ|θ − θ0| / N over the targeted weights (N entries)."""
    trained = copy.deepcopy(net)
    for p in trained.parameters():
        p.requires_grad_(False)
    weights = [trained.get_submodule(p).weight for p in TARGETS]
    for w in weights:
        w.requires_grad_(True)
    starts = [w.detach().clone() for w in weights]
    n = sum(w.numel() for w in weights)
    x, y = _data()
    trained.train()
    opt = torch.optim.SGD(weights, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        pull = sum((w - s).abs().sum() for w, s in zip(weights, starts)) / n
        (F.cross_entropy(trained(x), y) + l1 * pull).backward()
        opt.step()
    return {path: (_canonical(path, trained.get_submodule(path).weight).astype(np.float64)
                   - _canonical(path, net.get_submodule(path).weight)).reshape(-1) for path in TARGETS}


def test_dense_phase_l1_term_is_composable_sfts():
    net = _net()
    cfg = SftConfig(target_modules=TARGETS, density=0.25)
    l1 = 20.0
    changes = _changes_with_l1_by_hand(net, l1)
    flat = np.concatenate([np.abs(changes[p]) for p in TARGETS])
    top = np.array(_numpy_top(flat, 12 + 6))
    expected = {"0": top[top < 48].tolist(), "3": (top[top >= 48] - 48).tolist()}
    masks = lottery_ticket_masks(net, cfg, _sgd_steps, l1_lambda=l1)
    assert {p: m.tolist() for p, m in masks.items()} == expected
    plain = lottery_ticket_masks(net, cfg, _sgd_steps)
    assert {p: m.tolist() for p, m in plain.items()} != expected  # the term changes the selection


def test_lt_sft_rounds_add_k_over_n_new_entries_from_the_current_weights():
    from lava_peft.tools.sft import lt_sft

    net = _net()
    pristine = copy.deepcopy(net)
    cfg = SftConfig(target_modules=TARGETS, density=0.5, alpha=1.0)
    seen = []

    def sparse(model):
        seen.append({p: (a.sparse_indices.clone(), a.sparse_values.detach().clone()) for p, a in model.adapter_layers()})
        _sgd_steps(model, steps=2, lr=0.5)

    model = lt_sft(net, cfg, _sgd_steps, sparse, n_ft_iterations=2)
    first, second = seen
    assert sum(i.numel() for i, _ in first.values()) == 18 and sum(i.numel() for i, _ in second.values()) == 36
    # round 1: the global top 18 of the dense phase from θ0
    changes = _changes_by_hand(pristine)
    flat = np.concatenate([np.abs(changes[p]) for p in TARGETS])
    top = np.array(_numpy_top(flat, 18))
    assert {p: i.tolist() for p, (i, _) in first.items()} == {"0": top[top < 48].tolist(),
                                                              "3": (top[top >= 48] - 48).tolist()}
    # round 2: the dense phase starts from θ0 + φ1 (round 1's trained SFT merged into a copy), the 18 largest
    # changes among entries not selected yet are added; round-1 entries keep their trained values
    current = copy.deepcopy(pristine)
    with torch.no_grad():
        for path, (idx, _) in first.items():
            trained_values = second[path][1][torch.searchsorted(second[path][0], idx)]
            w = current.get_submodule(path).weight
            canon = (w if path == "0" else w.T).detach().clone().contiguous()
            canon.view(-1)[idx] += trained_values
            w.copy_(canon if path == "0" else canon.T)
    changes2 = _changes_by_hand(current)
    flat2 = np.concatenate([np.abs(changes2[p]) for p in TARGETS])
    taken = np.concatenate([first["0"][0].numpy(), first["3"][0].numpy() + 48])
    flat2[taken] = -np.inf
    top2 = np.array(_numpy_top(flat2, 18))
    new = {p: sorted(set(second[p][0].tolist()) - set(first[p][0].tolist())) for p in TARGETS}
    assert new == {"0": top2[top2 < 48].tolist(), "3": (top2[top2 >= 48] - 48).tolist()}
    for path, (idx, _) in first.items():
        new_idx = second[path][0]
        assert not set(new[path]) & set(idx.tolist())
        fresh = torch.tensor([i in set(new[path]) for i in new_idx.tolist()])
        assert torch.count_nonzero(second[path][1][fresh]) == 0  # new entries start at 0
    with pytest.raises(lp.LavaConfigError, match="n_ft_iterations"):
        lt_sft(_net(), cfg, _sgd_steps, sparse, n_ft_iterations=0)
