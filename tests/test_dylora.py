"""DyLoRA (rank-nested LoRA / LAVA) against independent computations.

Every expected value is built by hand from the raw factor tensors (slices, einsum over
CP components, ``F.conv*`` with ``W0 + ΔW``), never through the adapter's own code.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lava_peft as lp
import lava_peft.methods.dylora as dy
import lava_peft.tools.dylora as dyt
from _tiny_models import randomize_adapters, tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    base = dict(r=4, alpha=6.0, target_modules=["0"])
    return dy.DyLoraConfig(**{**base, **kw})


def _adapted(make_layer, seed=0, **kw):
    torch.manual_seed(seed)
    base = nn.Sequential(make_layer())
    pristine = copy.deepcopy(base)
    model = lp.adapt(base, _cfg(**kw))
    randomize_adapters(model, seed=seed, std=0.5)
    return model, pristine, model.model[0].adapters["default"]


def _factors(adapter):
    """(up, down, spatial factors) as plain detached tensors."""
    if isinstance(adapter, dy.DyLoraLavaAdapter):
        return adapter.lava_U.detach(), adapter.lava_V.detach(), [p.detach() for p in adapter.lava_P]
    return adapter.lora_B.detach(), adapter.lora_A.detach(), []


def _cp_delta(U, V, P, b, scale):
    """``scale · Σ_{j<b} u_j ⊗ v_j ⊗ p_{1j} ⊗ …`` one component at a time (float64)."""
    U, V, P = U.double(), V.double(), [p.double() for p in P]
    letters = "abc"[: len(P)]
    eq = "o,i," + ",".join(letters) + "->oi" + letters
    total = 0
    for j in range(b):
        total = total + torch.einsum(eq, U[:, j], V[j], *(p[j] for p in P))
    return scale * total


# =============================================================================== forward = formula
@pytest.mark.parametrize("factorization", ["lora", "lava"])
@pytest.mark.parametrize("rslora", [False, True])
def test_linear_output_at_every_rank_equals_truncated_formula(factorization, rslora, monkeypatch):
    model, pristine, adapter = _adapted(lambda: nn.Linear(7, 5), factorization=factorization, use_rslora=rslora)
    x = torch.randn(3, 7, dtype=torch.float64)
    W0, bias = pristine[0].weight.detach().double(), pristine[0].bias.detach().double()
    up, down, _ = _factors(adapter)
    model.eval()
    outputs = []
    for b in range(1, 5):
        dyt.set_rank(model, b)
        scale = 6.0 / (b**0.5 if rslora else b)
        expected = x @ W0.T + bias + scale * (x @ down[:b].double().T) @ up[:, :b].double().T
        with torch.no_grad():
            got = model(x.float()).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        outputs.append(got)
        # linear_factors feeds the fused node the truncated views and the rank-b scale
        f_down, f_up, f_scale = adapter.linear_factors()
        assert f_down.shape == (b, 7) and f_up.shape == (5, b) and f_scale == pytest.approx(scale)
        assert f_down.data_ptr() == down.data_ptr() and f_up.data_ptr() == up.data_ptr()  # views
    assert not torch.allclose(outputs[0], outputs[-1])  # the rank matters

    # in training the fused node runs with the drawn rank
    calls = []
    import lava_peft.methods.base as layers  # where fused_linear() calls the node

    real = layers.lowrank_linear

    def spy(x, weight, bias, down, up, scale):
        calls.append((down.shape[0], up.shape[1], scale))
        return real(x, weight, bias, down, up, scale)

    monkeypatch.setattr(layers, "lowrank_linear", spy)
    model.train()
    for _ in range(6):
        model(x.float())
        b = adapter.last_rank
        assert calls[-1] == (b, b, pytest.approx(6.0 / (b**0.5 if rslora else b)))
    assert len({c[0] for c in calls}) > 1


@pytest.mark.parametrize("conv_path", ["weight", "separable"])
def test_lava_conv_output_at_every_rank_equals_explicit_cp_sum(conv_path):
    conv = lambda: nn.Conv2d(4, 6, (3, 2), padding=1, stride=(1, 2))  # noqa: E731
    model, pristine, adapter = _adapted(conv, factorization="lava", conv_path=conv_path, r=3, alpha=3.0)
    x = torch.randn(2, 4, 7, 8)
    U, V, P = _factors(adapter)
    model.eval()
    for b in (1, 2, 3):
        dyt.set_rank(model, b)
        delta = _cp_delta(U, V, P, b, 3.0 / b)
        torch.testing.assert_close(adapter.delta_weight().double(), delta, rtol=1e-5, atol=1e-6)
        expected = F.conv2d(x.double(), pristine[0].weight.double() + delta, pristine[0].bias.double(),
                            stride=(1, 2), padding=1)
        with torch.no_grad():
            torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_lora_conv_is_flattened_and_truncated():
    model, pristine, adapter = _adapted(lambda: nn.Conv1d(3, 5, 3, padding=1), factorization="lora", r=3)
    x = torch.randn(2, 3, 9)
    B, A, _ = _factors(adapter)
    model.eval()
    for b in (1, 3):
        dyt.set_rank(model, b)
        delta = (6.0 / b) * (B[:, :b].double() @ A[:b].double()).reshape(5, 3, 3)
        expected = F.conv1d(x.double(), pristine[0].weight.double() + delta, pristine[0].bias.double(), padding=1)
        with torch.no_grad():
            torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


# =============================================================================== gradients
def _reference_linear(x, W0, bias, up, down, b, scale):
    return x @ W0.T + bias + scale * (x @ down[:b].T) @ up[:, :b].T


@pytest.mark.parametrize("update", ["full", "frozen"])
@pytest.mark.parametrize("factorization", ["lora", "lava"])
def test_linear_gradients_full_and_frozen(update, factorization):
    model, pristine, adapter = _adapted(lambda: nn.Linear(6, 5), factorization=factorization, update=update,
                                        orth_lambda=0.0 if factorization == "lava" else None)
    up_p, down_p = (adapter.lava_U, adapter.lava_V) if factorization == "lava" else (adapter.lora_B, adapter.lora_A)
    W0, bias = pristine[0].weight.detach(), pristine[0].bias.detach()
    x, g = torch.randn(4, 6), torch.randn(4, 5)
    seen = set()
    for _ in range(8):
        model.zero_grad()
        out = model(x)
        b = adapter.last_rank
        seen.add(b)
        (out * g).sum().backward()
        up = up_p.detach().clone().requires_grad_()
        down = down_p.detach().clone().requires_grad_()
        ref = _reference_linear(x, W0, bias, up, down, b, 6.0 / b)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        (ref * g).sum().backward()
        exp_up, exp_down = up.grad.clone(), down.grad.clone()
        if update == "frozen":  # only component b learns
            exp_up[:, : b - 1] = 0
            exp_down[: b - 1] = 0
        assert torch.count_nonzero(exp_up[:, b - 1]) > 0
        torch.testing.assert_close(up_p.grad, exp_up, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(down_p.grad, exp_down, rtol=1e-5, atol=1e-6)
        if update == "frozen":
            assert torch.count_nonzero(up_p.grad[:, : b - 1]) == 0 and torch.count_nonzero(down_p.grad[: b - 1]) == 0
        assert torch.count_nonzero(up_p.grad[:, b:]) == 0 and torch.count_nonzero(down_p.grad[b:]) == 0
    assert len(seen) >= 3 and max(seen) >= 3


@pytest.mark.parametrize("update", ["full", "frozen"])
def test_lava_conv_gradients_include_orth_term_on_active_components(update):
    conv = lambda: nn.Conv2d(3, 5, 3, padding=1)  # noqa: E731
    model, pristine, adapter = _adapted(conv, factorization="lava", update=update, orth_lambda=0.3, r=3,
                                        conv_path="separable")
    params = [adapter.lava_U, adapter.lava_V, *adapter.lava_P]
    x, g = torch.randn(2, 3, 6, 6), torch.randn(2, 5, 6, 6)
    seen = set()
    for _ in range(7):
        model.zero_grad()
        out = model(x)
        b = adapter.last_rank
        seen.add(b)
        ((out * g).sum() + model.regularization_loss()).backward()
        U, V, P1, P2 = (p.detach().clone().requires_grad_() for p in params)
        delta = (6.0 / b) * torch.einsum("oj,ji,ja,jb->oiab", U[:, :b], V[:b], P1[:b], P2[:b])
        ref = F.conv2d(x, pristine[0].weight + delta, pristine[0].bias, padding=1)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        gram = U[:, :b].T @ U[:, :b]
        orth = 0.3 * (gram - torch.eye(b)).pow(2).sum()  # one layer: the mean is the term
        ((ref * g).sum() + orth).backward()
        for p, ref_p in zip(params, (U, V, P1, P2)):
            expected = ref_p.grad.clone()
            if p is adapter.lava_U:
                expected[:, b:] = 0
                if update == "frozen":
                    expected[:, : b - 1] = 0
            else:
                expected[b:] = 0
                if update == "frozen":
                    expected[: b - 1] = 0
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-5)
    assert len(seen) >= 2 and max(seen) >= 2


def test_checkpoint_recomputation_reuses_the_forward_rank():
    from torch.utils.checkpoint import checkpoint

    grads = {}
    for use_ckpt in (False, True):
        model, _, adapter = _adapted(lambda: nn.Linear(6, 5), update="frozen")
        x = torch.randn(3, 6, requires_grad=True)
        ranks = []
        for _ in range(4):
            model.zero_grad()
            out = checkpoint(model, x, use_reentrant=False) if use_ckpt else model(x)
            out.pow(2).sum().backward()
            ranks.append(adapter.last_rank)
        grads[use_ckpt] = (ranks, adapter.lora_A.grad.clone(), adapter.lora_B.grad.clone())
    assert grads[True][0] == grads[False][0]
    torch.testing.assert_close(grads[True][1], grads[False][1])
    torch.testing.assert_close(grads[True][2], grads[False][2])


# =============================================================================== rank controller
class ThreeLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _rank_trace(cfg, steps=150, seed=0):
    torch.manual_seed(seed)
    model = lp.adapt(ThreeLayers(), cfg)
    x = torch.randn(2, 6)
    layers = [a for _, a in model.adapter_layers()]
    trace = []
    with torch.no_grad():
        for _ in range(steps):
            model(x)
            trace.append(tuple(a.last_rank for a in layers))
    return model, trace


def test_sampling_is_reproducible_uniform_and_per_layer():
    cfg = lambda seed: dy.DyLoraConfig(r=4, r_min=2, target_modules=["a", "b", "c"], seed=seed)  # noqa: E731
    model, trace = _rank_trace(cfg(5))
    assert _rank_trace(cfg(5))[1] == trace  # same seed: same ranks
    assert _rank_trace(cfg(6))[1] != trace
    flat = [b for step in trace for b in step]
    counts = {b: flat.count(b) for b in set(flat)}
    assert set(counts) == {2, 3, 4}
    assert all(100 <= n <= 200 for n in counts.values()), counts  # 450 draws, 150 expected each
    assert any(len(set(step)) > 1 for step in trace)  # layers draw independently
    assert dyt.rank_sampler(model).step == 149  # one step per forward pass
    # eval: the fixed rank, no draws
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 6))
    assert [a.last_rank for _, a in model.adapter_layers()] == [4, 4, 4]
    dyt.set_rank(model, 3)
    with torch.no_grad():
        model(torch.randn(2, 6))
    assert [a.last_rank for _, a in model.adapter_layers()] == [3, 3, 3]
    assert dyt.rank_sampler(model).step == 149


def test_global_sampling_gives_one_rank_per_forward_clipped_per_layer():
    cfg = dy.DyLoraConfig(r=4, target_modules=["a", "b", "c"], rank_sampling="global", rank_pattern={"c": 2})
    _, trace = _rank_trace(cfg, steps=60)
    for a, b, c in trace:
        assert a == b and c == min(a, 2)
    assert {t[0] for t in trace} == {1, 2, 3, 4}


def test_eval_across_ranks_restores_mode_and_rank():
    model, pristine, adapter = _adapted(lambda: nn.Linear(5, 3), r=3)
    x = torch.randn(4, 5)
    up, down, _ = _factors(adapter)
    model.train()
    dyt.set_rank(model, 2)
    results = dyt.eval_across_ranks(model, [1, 3], lambda m: (m.training, m(x).detach()))
    for b in (1, 3):
        training, out = results[b]
        assert not training
        expected = _reference_linear(x, pristine[0].weight, pristine[0].bias, up, down, b, 6.0 / b)
        torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)
    assert model.training and adapter.training and adapter.fixed_rank == 2
    assert model.peft_config["default"].eval_rank == 2


# =============================================================================== save / merge / export
class EmbLinConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.conv = nn.Embedding(20, 8), nn.Linear(8, 6), nn.Conv1d(6, 4, 3, padding=1)

    def forward(self, ids):
        return self.conv(self.lin(self.emb(ids)).transpose(1, 2))


def _trained(factorization, steps=4, **kw):
    torch.manual_seed(0)
    base = EmbLinConv()
    pristine = copy.deepcopy(base)
    cfg = dy.DyLoraConfig(r=4, alpha=5.0, target_modules=["emb", "lin", "conv"], factorization=factorization, **kw)
    model = lp.adapt(base, cfg)
    ids = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        (model(ids).pow(2).mean() - model(ids).mean() + model.regularization_loss()).backward()
        opt.step()
    randomize_adapters(model, seed=3, std=0.2)  # every component non-zero
    return model.eval(), pristine, ids


def _at(model, b, ids, name="default"):
    dyt.set_rank(model, b, name)
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("factorization", ["lora", "lava"])
def test_save_load_gives_same_outputs_at_several_ranks(factorization, tmp_path):
    model, pristine, ids = _trained(factorization)
    dyt.set_rank(model, 2)  # persisted as eval_rank
    model.save_pretrained(tmp_path)
    loaded = lp.AdaptedModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    assert loaded.peft_config["default"].eval_rank == 2
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    outs = [_at(model, b, ids) for b in (1, 3, 4)]
    for b, out in zip((1, 3, 4), outs):
        assert torch.equal(_at(loaded, b, ids), out)
    assert not torch.allclose(outs[0], outs[-1])


@pytest.mark.parametrize("factorization", ["lora", "lava"])
def test_merge_at_rank_b_equals_unmerged_and_set_rank_remerges(factorization):
    model, pristine, ids = _trained(factorization)
    w0 = pristine.conv.weight.detach().clone()
    for b in (1, 3):
        unmerged = _at(model, b, ids)
        model.merge_adapter()
        with torch.no_grad():
            torch.testing.assert_close(model(ids), unmerged, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model.model.conv.base_layer.weight, w0, rtol=0, atol=1e-6)
    # set_rank on a merged adapter re-merges at the new rank
    at4 = _at(model, 4, ids)
    dyt.set_rank(model, 2)
    at2 = _at(model, 2, ids)
    model.merge_adapter()
    dyt.set_rank(model, 4)
    assert model.merged_adapters == ["default"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), at4, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(at2, at4)


@pytest.mark.parametrize("factorization", ["lora", "lava"])
def test_truncated_export_equals_dylora_at_b(factorization, tmp_path):
    model, pristine, ids = _trained(factorization, rank_pattern={"conv": 2}, alpha_pattern={"lin": 3.0},
                                    use_rslora=True)
    for b in (1, 3):
        expected = _at(model, b, ids)
        name = dyt.truncate_to_rank(model, b)
        assert name == f"default_r{b}"
        cfg = model.peft_config[name]
        assert cfg.method == factorization and type(cfg) is not dy.DyLoraConfig
        assert {p: a.r for p, a in model.adapter_layers(name)} == {"emb": b, "lin": b, "conv": min(b, 2)}
        model.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-6)
        # a plain lava-peft load of the saved file gives the same
        model.save_pretrained(tmp_path / name, adapter_name=name)
        plain = lp.AdaptedModel.from_pretrained(copy.deepcopy(pristine), tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(plain(ids), expected, rtol=1e-5, atol=1e-6)
        model.set_adapter("default")


def test_peft_round_trip_of_the_truncated_lora(tmp_path):
    import peft

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    model = lp.adapt(tiny_bert(), dy.DyLoraConfig(r=4, alpha=4.0, target_modules=["query", "value"],
                                                  modules_to_save=["classifier"]))
    randomize_adapters(model)
    model.eval()  # (new adapters start in training mode, where ranks are drawn)
    logits = {b: _at(model, b, ids).logits for b in (2, 4)}
    dyt.save_at_rank(model, 2, str(tmp_path), peft=True)
    assert list(model.peft_config) == ["default"] and model.peft_config["default"].eval_rank == 4  # unchanged
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path)).eval()
    with torch.no_grad():
        out = theirs(input_ids=ids).logits
    torch.testing.assert_close(out, logits[2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, logits[4], atol=1e-4)


# =============================================================================== errors
@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(r_min=5), "r_min=5 is larger"),
        (dict(r_min=2, rank_pattern={"0": 1}), "lower r_min to at most 1"),
        (dict(r_min=0), "r_min must be a positive integer"),
        (dict(update="partial"), "update must be 'full'"),
        (dict(factorization="tucker"), "factorization must be 'lora' or 'lava'"),
        (dict(rank_sampling="per_step"), "rank_sampling must be"),
        (dict(orth_lambda=0.1), "apply to factorization='lava' only"),
        (dict(factorization="lava", init="default"), "LavaConfig.init"),
        (dict(eval_rank=9), "eval_rank must be an integer in [r_min, r] = [1, 4]"),
        (dict(seed=1.5), "seed must be an integer"),
    ],
)
def test_config_errors_say_what_to_change(kw, needle):
    with pytest.raises(lp.LavaConfigError) as err:
        _cfg(**kw)
    assert needle in str(err.value)


def test_rank_errors_are_clear_and_change_nothing():
    model, _, adapter = _adapted(lambda: nn.Linear(5, 3), r=3, r_min=2)
    x = torch.randn(2, 5)
    dyt.set_rank(model, 2)
    model.eval()
    with torch.no_grad():
        before = model(x)
    cfg_before = dataclasses.asdict(model.peft_config["default"])
    calls = []
    for bad in (1, 4, 0, 2.5, True, "2"):
        for fn in (lambda b: dyt.set_rank(model, b), lambda b: dyt.truncate_to_rank(model, b),
                   lambda b: dyt.eval_across_ranks(model, [3, b], calls.append),
                   lambda b: adapter.delta_weight(rank=b)):
            with pytest.raises(lp.LavaConfigError, match=r"outside the trained range \[r_min, r\] = \[2, 3\]"):
                fn(bad)
    assert calls == [] and adapter.fixed_rank == 2 and list(model.peft_config) == ["default"]
    assert dataclasses.asdict(model.peft_config["default"]) == cfg_before
    with torch.no_grad():
        assert torch.equal(model(x), before)
    # a name that exists: nothing is added
    with pytest.raises(lp.AdapterNameError):
        dyt.truncate_to_rank(model, 2, new_name="default")
    assert list(model.peft_config) == ["default"]
    # a non-DyLoRA adapter
    model.add_adapter("plain", lp.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(lp.LavaConfigError, match="'plain' is a 'lora' adapter; rank control needs a 'dylora'"):
        dyt.set_rank(model, 2, "plain")


# =============================================================================== real data
def test_minilm_dylora_on_query_value_lowers_the_loss_at_several_ranks():
    import transformers

    from lava_peft.train.tasks import load_text_data, minilm_path

    transformers.logging.set_verbosity_error()
    path = minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    data, _ = load_text_data(tok, 16, 2, seed=0, max_len=24)
    torch.manual_seed(0)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = lp.adapt(base, dy.DyLoraConfig(r=4, alpha=8.0, target_modules=["query", "value"], seed=1))
    inputs = {k: v for k, v in data.items() if k != "labels"}

    def loss_of(m):
        with torch.no_grad():
            return F.cross_entropy(m(**inputs).logits, data["labels"]).item()

    before = dyt.eval_across_ranks(model, [1, 2, 4], loss_of)
    assert before[1] == before[4]  # ΔW = 0 at init
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(model(**inputs).logits, data["labels"]).backward()
        opt.step()
    after = dyt.eval_across_ranks(model, [1, 2, 4], loss_of)
    assert all(after[b] < before[b] - 0.02 for b in (1, 2, 4)), (before, after)
    assert len({round(v, 6) for v in after.values()}) == 3  # the ranks give different models


def test_export_peft_of_a_dylora_adapter_points_to_save_at_rank(tmp_path):
    model = lp.adapt(nn.Sequential(nn.Linear(6, 4)), lp.DyLoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(lp.LavaConfigError, match="save_at_rank"):
        lp.export_peft(model, str(tmp_path / "peft"))
    assert not (tmp_path / "peft").exists()
