"""Shared-input fusion (``lava_peft/fused_siblings.py``) equals the unfused path, and falls back where it must.

Every comparison runs the same model twice from identical weights: once with
``shared_input_fusion`` on (after one observed pass, q/k/v and gate/up run as one node) and
once off (each layer its own fused node, ``fused_linear.py``).

Tolerances.  fp32: ``|a − b| ≤ 1e-5·max|b| + 1e-5·|b|`` per tensor (the paths differ only in
summation order; rounding scales with the largest entries summed — the tiny Llama with random
adapters has input gradients up to ~40, and both paths are ~1e-4 from an fp64 run there).
bf16: the outputs are bit-identical (the same products, rounded once each); the input gradient
differs (fused: one bf16 buffer accumulates ``∂H V + Σ ∂y_i W_i``; unfused: three bf16 gradients
summed by autograd), and every earlier layer inherits the difference; so in a whole model each
gradient's relative error (Frobenius norm) against an fp64 run must be at most ``2×`` the
unfused path's ``+ 1e-2`` (both are 1e-2–3e-1 on these tiny random models; the worst ratio
seen is 1.7, on a first-layer factor whose gradient cancels heavily).  On one node with the
same upstream gradient (``test_node_bf16``) the bound is ``1.25×`` the separate nodes' error
``+ 1e-3``.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import lava_peft as lp
from lava_peft.fused_siblings import CandidateSet, SiblingGroup, shared_input_lowrank
from lava_peft.inject import shared_input_groups
from _tiny_models import conv_net, randomize_adapters, tiny_bert, tiny_llama

FP32 = dict(atol=1e-5, rtol=1e-5)

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_RANKS = {"query": 2, "key": 4, "value": 6}  # different ranks inside one group
LLAMA_RANKS = {"q_proj": 2, "k_proj": 3, "v_proj": 5, "gate_proj": 6}


def _config(method: str, targets, ranks, **extra):
    cls = lp.LavaConfig if method == "lava" else lp.LoraConfig
    return cls(r=4, alpha=8, target_modules=targets, rank_pattern=ranks, **extra)


def _build(arch: str, method: str, fused: bool, dtype=torch.float32, **extra):
    base = tiny_bert() if arch == "bert" else tiny_llama()
    targets, ranks = (BERT_TARGETS, BERT_RANKS) if arch == "bert" else (LLAMA_TARGETS, LLAMA_RANKS)
    model = lp.adapt(base, _config(method, targets, ranks, **extra))
    randomize_adapters(model, seed=1)
    model.shared_input_fusion = fused
    return model.to(dtype)


def _embeds(model, seed: int = 0, batch: int = 3, seq: int = 7):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (batch, seq), generator=gen)
    return model.get_input_embeddings()(ids).detach()


def _step(model, embeds):
    """One forward + backward on ``inputs_embeds``: (output, input gradient, {parameter: gradient})."""
    x = embeds.clone().requires_grad_(True)
    out = model(inputs_embeds=x).logits
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad.detach(), grads


def _fused_calls(model) -> int:
    return sum(g.fused_calls for g in shared_input_groups(model.model) if isinstance(g, SiblingGroup))


def _groups(model) -> list[list[str]]:
    names = {id(m): n for n, m in model.model.named_modules()}
    return sorted(sorted(names[id(m)].rsplit(".", 1)[-1] for m in g.members) for g in shared_input_groups(model.model))


def _close(a, b, name=""):
    """fp32 equality up to summation order, the absolute bound scaled by the tensor's largest entry."""
    torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()) + 1e-7, rtol=1e-5, msg=name or None)


def _assert_same(a, b):
    out_a, gx_a, grads_a = a
    out_b, gx_b, grads_b = b
    _close(out_a, out_b, "output")
    _close(gx_a, gx_b, "input gradient")
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        _close(grads_a[name], grads_b[name], name)


# =========================================================================== the node alone
@pytest.mark.parametrize("concat_forward", [False, True])
def test_node_equals_separate_products_with_unused_output_and_no_bias(concat_forward):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, requires_grad=True)
    terms = [(torch.randn(7, 12), torch.randn(7), torch.randn(2, 12, requires_grad=True),
              torch.randn(7, 2, requires_grad=True), 0.5),
             (torch.randn(4, 12), None, torch.randn(3, 12, requires_grad=True), torch.randn(4, 3, requires_grad=True), 2.0),
             (torch.randn(9, 12), torch.randn(9), torch.randn(1, 12, requires_grad=True),
              torch.randn(9, 1, requires_grad=True), 1.0)]
    outs = shared_input_lowrank(x, terms, concat_forward)
    (outs[0].sum() * 3 + (outs[1] ** 2).sum()).backward()  # outs[2] unused: zero gradient from it
    leaves = [x] + [t for term in terms for t in term[2:4]]
    fused = [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    refs = [x @ w.T + (0 if b is None else b) + s * (x @ v.T) @ u.T for w, b, v, u, s in terms]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, **FP32)
    (refs[0].sum() * 3 + (refs[1] ** 2).sum()).backward()
    expected = [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]
    assert expected[-1].abs().sum() == 0 and fused[2].abs().sum() > 0
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want, **FP32)


def test_node_bf16():
    from lava_peft.fused_linear import lowrank_linear

    gen = torch.Generator().manual_seed(4)
    x64 = torch.randn(64, 48, generator=gen, dtype=torch.float64)
    g64 = [torch.randn(64, o, generator=gen, dtype=torch.float64) for o in (32, 16, 40)]
    terms64 = [(torch.randn(o, 48, generator=gen, dtype=torch.float64) / 7, torch.randn(o, generator=gen, dtype=torch.float64),
                torch.randn(r, 48, generator=gen, dtype=torch.float64) / 7, torch.randn(o, r, generator=gen, dtype=torch.float64) / 3,
                s) for o, r, s in ((32, 2, 2.0), (16, 4, 1.0), (40, 8, 0.5))]

    def run(dtype, fused):
        x = x64.to(dtype).clone().requires_grad_(True)
        factors = [(w.to(dtype), b.to(dtype), v.float().requires_grad_(True), u.float().requires_grad_(True), s)
                   for w, b, v, u, s in terms64]
        if dtype == torch.float64:
            factors = [(w, b, v.double().detach().requires_grad_(True), u.double().detach().requires_grad_(True), s)
                       for w, b, v, u, s in factors]
        outs = shared_input_lowrank(x, factors) if fused else [lowrank_linear(x, *t) for t in factors]
        sum((o * g.to(dtype)).sum() for o, g in zip(outs, g64)).backward()
        return [o.detach().double() for o in outs] + [x.grad.double()] + [t.grad.double() for f in factors for t in f[2:4]]

    exact, fused, plain = run(torch.float64, True), run(torch.bfloat16, True), run(torch.bfloat16, False)
    for e, f, p in zip(exact, fused, plain):
        f_err, p_err = float((f - e).norm() / e.norm()), float((p - e).norm() / e.norm())
        assert 0 < f_err <= 1.25 * p_err + 1e-3, (f_err, p_err)


# =========================================================================== whole models, fp32
@pytest.mark.parametrize("method", ["lora", "lava"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_fused_training_step_equals_unfused(arch, method):
    fused, plain = _build(arch, method, True), _build(arch, method, False)
    fused.train(), plain.train()
    embeds = _embeds(fused)
    _step(fused, embeds)  # the observed pass decides the groups (runs unfused)
    _step(plain, embeds)
    before = _fused_calls(fused)
    result = _step(fused, embeds)
    _assert_same(result, _step(plain, embeds))
    layers = 2
    expected_groups = [["key", "query", "value"]] * layers if arch == "bert" else \
        [["gate_proj", "up_proj"]] * layers + [["k_proj", "q_proj", "v_proj"]] * layers
    assert _groups(fused) == sorted(expected_groups)  # o_proj / down_proj read other inputs: alone
    assert _fused_calls(fused) - before == len(expected_groups)  # every group ran one node this step
    assert _fused_calls(plain) == 0


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_fused_outputs_are_bit_identical_to_unfused(arch):
    """The forward runs the per-layer products: a fresh model's first (observed) call, later fused calls
    and the unfused path agree bit for bit (reloaded adapters reproduce a trained model's outputs exactly)."""
    fused, plain = _build(arch, "lava", True), _build(arch, "lava", False)
    embeds = _embeds(fused, seed=3)
    with torch.no_grad():
        first = fused(inputs_embeds=embeds).logits
        before = _fused_calls(fused)
        out = fused(inputs_embeds=embeds).logits
        assert torch.equal(out, first) and torch.equal(out, plain(inputs_embeds=embeds).logits)
    assert _fused_calls(fused) - before == (2 if arch == "bert" else 4)
    for group in shared_input_groups(fused.model):
        group.concat_forward = True  # one GEMM for H: equal up to summation order only
    with torch.no_grad():
        _close(fused(inputs_embeds=embeds).logits, first)
    assert _fused_calls(fused) - before == (4 if arch == "bert" else 8)


# =========================================================================== bf16
@pytest.mark.parametrize("method", ["lora", "lava"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_fused_bf16_within_stated_tolerance(arch, method):
    fused = _build(arch, method, True, dtype=torch.bfloat16)
    plain = _build(arch, method, False, dtype=torch.bfloat16)
    ref = _build(arch, method, False, dtype=torch.float64)
    fused.train(), plain.train(), ref.train()
    embeds = _embeds(ref)
    _step(fused, embeds.bfloat16())
    before = _fused_calls(fused)
    got = _step(fused, embeds.bfloat16())
    assert _fused_calls(fused) > before
    assert all(g.dtype == torch.float32 for g in got[2].values())  # factor gradients come back in fp32
    base = _step(plain, embeds.bfloat16())
    want = _step(ref, embeds)
    assert torch.equal(got[0], base[0])  # forward: bit-identical
    pairs = [("input gradient", got[1], base[1], want[1])] + [(n, got[2][n], base[2][n], want[2][n]) for n in want[2]]
    worst = 0.0
    for name, fused_grad, plain_grad, exact in pairs:
        norm = float(exact.norm())
        fused_err = float((fused_grad.double() - exact).norm()) / norm
        plain_err = float((plain_grad.double() - exact).norm()) / norm
        worst = max(worst, fused_err / (plain_err + 1e-3))
        assert fused_err <= 2 * plain_err + 1e-2, (name, fused_err, plain_err)
    print(f"worst ratio {worst:.3f}")


# =========================================================================== fallbacks
def _warm(model, embeds):
    with torch.no_grad():
        model(inputs_embeds=embeds)
    return _fused_calls(model)


def _check_fallback(fused, plain, embeds, run=lambda m, e: m(inputs_embeds=e).logits):
    before = _warm(fused, embeds)
    with torch.no_grad():
        got, want = run(fused, embeds), run(plain, embeds)
    _close(got, want)
    assert _fused_calls(fused) == before


def test_merged_adapters_fall_back():
    fused, plain = _build("bert", "lava", True), _build("bert", "lava", False)
    embeds = _embeds(fused)
    _warm(fused, embeds)
    fused.merge_adapter(), plain.merge_adapter()
    _check_fallback(fused, plain, embeds)


def test_disabled_adapters_fall_back():
    fused, plain = _build("llama", "lora", True), _build("llama", "lora", False)
    embeds = _embeds(fused)

    def run(model, e):
        with model.disable_adapter():
            return model(inputs_embeds=e).logits

    _check_fallback(fused, plain, embeds, run)


def _two_adapters(fused: bool):
    model = _build("bert", "lora", fused)
    model.add_adapter("other", _config("lava", BERT_TARGETS, {"query": 3}))
    randomize_adapters(model, seed=2)
    model.shared_input_fusion = fused
    return model


def test_mixed_batch_falls_back():
    fused, plain = _two_adapters(True), _two_adapters(False)
    embeds = _embeds(fused)
    _check_fallback(fused, plain, embeds,
                    lambda m, e: m(inputs_embeds=e, adapter_names=["default", "other", "__base__"]).logits)


def test_two_active_adapters_fall_back():
    fused, plain = _two_adapters(True), _two_adapters(False)
    fused.set_adapter(["default", "other"]), plain.set_adapter(["default", "other"])
    _check_fallback(fused, plain, _embeds(fused))


def test_adapter_dropout_falls_back_in_training_and_fuses_in_eval():
    fused, plain = _build("bert", "lora", True, dropout=0.3), _build("bert", "lora", False, dropout=0.3)
    embeds = _embeds(fused)
    before = _warm(fused, embeds)
    fused.train(), plain.train()
    torch.manual_seed(5)
    got = _step(fused, embeds)
    torch.manual_seed(5)
    _assert_same(got, _step(plain, embeds))  # same dropout masks drawn in the same order
    assert _fused_calls(fused) == before
    fused.eval()
    _warm(fused, embeds)
    assert _fused_calls(fused) > before


@pytest.mark.parametrize("config", [lp.LoraConfig(r=4, target_modules=BERT_TARGETS, use_dora=True),
                                    lp.ShiraConfig(r=2, target_modules=BERT_TARGETS)], ids=["dora", "shira"])
def test_methods_without_the_default_low_rank_node_fall_back(config):
    models = []
    for flag in (True, False):
        model = lp.adapt(tiny_bert(), copy.deepcopy(config))
        randomize_adapters(model, seed=1)
        model.shared_input_fusion = flag
        models.append(model)
    _check_fallback(*models, _embeds(models[0]))
    assert _groups(models[0]) == [["key", "query", "value"]] * 2  # the groups exist; the members decline


def test_switch_off_then_on():
    model = _build("llama", "lava", True)
    embeds = _embeds(model)
    _warm(model, embeds)
    model.shared_input_fusion = False
    before = _warm(model, embeds)
    assert _warm(model, embeds) == before
    model.shared_input_fusion = True
    assert _warm(model, embeds) == before + 4


def test_conv_layers_are_never_candidates():
    model = lp.adapt(conv_net(), lp.LavaConfig(r=2, target_modules=["c1", "c2", "c3"]))
    model(torch.randn(2, 3, 8, 8))
    assert shared_input_groups(model.model) == []


class _TwoInputs(nn.Module):
    """q reads ``x``; k and v read ``x`` too unless ``cross`` (then ``memory``), like cross-attention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)
        self.cross = False
        self.skip_k = False

    def forward(self, x, memory):
        source = memory if self.cross else x
        k = torch.zeros(1) if self.skip_k else self.k(source)
        return self.q(x).sum() + (k.sum() if torch.is_tensor(k) else 0) + self.v(source).sum()


def test_layers_reading_different_inputs_never_group():
    model = lp.adapt(_TwoInputs(), lp.LoraConfig(r=2, target_modules=["q", "k", "v"]))
    model.model.cross = True
    x, memory = torch.randn(3, 6), torch.randn(3, 6)
    assert isinstance(shared_input_groups(model.model)[0], CandidateSet)
    model(x, memory)
    assert _groups(model) == [["k", "v"]]  # k and v share `memory`; q alone
    model(x, memory)
    assert _fused_calls(model) == 1


def test_unclaimed_outputs_turn_the_group_off():
    model = lp.adapt(_TwoInputs(), lp.LoraConfig(r=2, target_modules=["q", "k", "v"]))
    randomize_adapters(model)
    x, memory = torch.randn(3, 6), torch.randn(3, 6)
    model(x, memory)  # observed: q, k, v share x
    (group,) = shared_input_groups(model.model)
    model.model.skip_k = True  # from now on k is never called: its fused output is never claimed
    model(x, memory)
    assert group.state == "shared" and group.fused_calls == 1
    x2 = torch.randn(3, 6)
    out = model(x2, memory)
    assert group.state == "unshared" and group.fused_calls == 1
    model.shared_input_fusion = False
    torch.testing.assert_close(out, model(x2, memory), **FP32)


def test_copies_and_pickles_after_a_fused_step():
    model = _build("bert", "lora", True)
    model.train()
    embeds = _embeds(model)
    _step(model, embeds)
    out = _step(model, embeds)[0]
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(clone(inputs_embeds=embeds).logits.detach(), out, **FP32)
        assert _fused_calls(clone) == _fused_calls(model) + 2  # the copy's groups fuse on their own


def test_compiled_model_runs_each_layer_on_its_own():
    model, plain = _build("bert", "lora", True), _build("bert", "lora", False)
    embeds = _embeds(model)
    before = _warm(model, embeds)  # observed eagerly: the groups exist
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        _close(compiled(inputs_embeds=embeds).logits, plain(inputs_embeds=embeds).logits)
    assert _fused_calls(model) == before  # traced code takes the per-layer path


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_equals_unfused(reentrant):
    """Non-reentrant checkpointing recomputes each block in the backward and requires the same saved
    tensors: the first (observed) pass and the recomputation must take the same path."""
    fused, plain = _build("llama", "lora", True), _build("llama", "lora", False)
    for model in (fused, plain):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    embeds = _embeds(fused)
    for _ in range(3):  # observed pass, then decided groups, then once more
        _assert_same(_step(fused, embeds), _step(plain, embeds))
    assert all(g.state == "shared" for g in shared_input_groups(fused.model) if isinstance(g, SiblingGroup))
    if not reentrant:  # the blocks run inside saved-tensor hooks: each layer on its own
        assert _fused_calls(fused) == 0
