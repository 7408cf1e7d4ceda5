"""LAVA Tucker-2 conv adapters, LAVA's function class on 1×1 convs, and the gradient-variance probe.

Every check compares with an independent computation (einsum over the Tucker formula, a plain
conv with ``W0 + ΔW``, gradients collected one minibatch at a time by hand).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lava_peft as lp
from lava_peft.diagnostics import gradient_variance
from lava_peft.errors import LavaConfigError, LavaError
from lava_peft.methods.factors import Factors, factor_codec
from lava_peft.methods.tucker_conv import tucker_compress, tucker_hosvd, tucker_params


def _adapter(model, name="default"):
    return model.adapter_layers(name)[0][1]


def _randomize(model, name="default", seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in model.adapter_layers(name):
            for p in a.parameters():
                p.copy_(torch.randn(p.shape, generator=g))


def _tucker_einsum(a):
    letters = "klm"[: a.lava_core.dim() - 2]
    return torch.einsum(f"oa,ab{letters},bi->oi{letters}", a.lava_U, a.lava_core, a.lava_V) * a.scale


CONVS = [
    ("conv1d", lambda: nn.Conv1d(6, 10, 3, stride=2, padding=1), (2, 6, 11)),
    ("conv2d_reflect_dilated", lambda: nn.Conv2d(6, 8, 3, padding="same", padding_mode="reflect", dilation=2),
     (2, 6, 9, 9)),
    ("conv2d_grouped", lambda: nn.Conv2d(8, 12, 3, groups=4, stride=2), (2, 8, 9, 9)),
    ("conv2d_depthwise", lambda: nn.Conv2d(8, 8, 3, groups=8, padding=1, bias=False), (2, 8, 7, 7)),
    ("conv2d_circular", lambda: nn.Conv2d(5, 7, (3, 2), padding=1, padding_mode="circular"), (2, 5, 6, 6)),
    ("conv3d", lambda: nn.Conv3d(4, 6, (3, 2, 2), padding=1), (2, 4, 5, 5, 5)),
]


@pytest.mark.parametrize("name,make,shape", CONVS, ids=[c[0] for c in CONVS])
def test_tucker_delta_chain_and_weight_path_agree_with_the_formula(name, make, shape):
    torch.manual_seed(0)
    conv = make()
    x = torch.randn(*shape)
    outs, grads = {}, {}
    for path in ("separable", "weight"):
        model = lp.adapt(nn.Sequential(make()), lp.LavaConfig(r=3, alpha=6, target_modules="all-conv",
                                                                factorization="tucker", conv_path=path))
        model.model[0].base_layer.load_state_dict(conv.state_dict())
        _randomize(model)
        a = _adapter(model)
        dw = _tucker_einsum(a)
        torch.testing.assert_close(a.delta_weight(), dw, rtol=1e-5, atol=1e-5)
        ref = conv._conv_forward(x, conv.weight + dw, conv.bias)
        y = model(x)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        y.pow(2).sum().backward()
        outs[path] = y.detach()
        grads[path] = [p.grad.clone() for p in a.parameters()]
    torch.testing.assert_close(outs["separable"], outs["weight"], rtol=1e-4, atol=1e-4)
    for g1, g2 in zip(grads["separable"], grads["weight"]):
        torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-3)


def test_tucker_shapes_parameter_count_and_init():
    model = lp.adapt(nn.Sequential(nn.Conv2d(64, 128, 3), nn.Conv2d(128, 128, 3, groups=128)),
                     lp.LavaConfig(r=8, target_modules="all-conv", factorization="tucker"))
    dense, dw = model.model[0].adapters["default"], model.model[1].adapters["default"]
    assert (dense.lava_U.shape, dense.lava_core.shape, dense.lava_V.shape) == ((128, 8), (8, 8, 3, 3), (8, 64))
    # depthwise: I/g = 1, so r_i = 1
    assert (dw.lava_U.shape, dw.lava_core.shape, dw.lava_V.shape) == ((128, 8), (8, 1, 3, 3), (1, 1))
    assert sum(p.numel() for p in dense.parameters()) == 8 * 128 + 8 * 64 + 8 * 8 * 9 == 2112
    assert sum(p.numel() for p in dw.parameters()) == 8 * 128 + 1 + 8 * 9 == 1097
    assert tucker_params(model.model[0].spec, 8) == 2112
    assert len(dense.lava_P) == 0
    torch.testing.assert_close(dense.lava_U.T @ dense.lava_U, torch.eye(8))  # LAVA's roles: U orthonormal, V = 0
    assert dense.delta_weight().abs().max() == 0
    with pytest.raises(LavaConfigError, match="factorization"):
        lp.LavaConfig(r=2, target_modules="all-conv", factorization="tt")
    with pytest.raises(LavaConfigError, match="larger than allowed"):
        lp.adapt(nn.Sequential(nn.Conv2d(4, 6, 3)), lp.LavaConfig(r=7, target_modules="all-conv", factorization="tucker"))


def test_tucker_depthwise_is_exactly_lora_flattened_form():
    """On a depthwise conv every rank-r ``O × ΠK`` matrix is a Tucker-2 increment (and nothing else)."""
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8)),
                     lp.LavaConfig(r=3, alpha=3, target_modules="all-conv", factorization="tucker"))
    a = _adapter(model)
    A, B = torch.randn(8, 3), torch.randn(3, 9)
    with torch.no_grad():
        a.lava_U.copy_(A)
        a.lava_V.fill_(1.0)
        a.lava_core.copy_(B.view(3, 1, 3, 3))
    torch.testing.assert_close(a.delta_weight().reshape(8, 9), A @ B)
    _randomize(model)
    assert torch.linalg.matrix_rank(a.delta_weight().reshape(8, 9).double(), rtol=1e-5) <= 3


def test_lava_on_1x1_conv_has_loras_function_class():
    """ΔW of LAVA (CP) on a 1×1 conv ranges over exactly the matrices of rank ≤ r, as LoRA's does."""
    torch.manual_seed(0)
    O, I, r = 12, 10, 3
    lava = lp.adapt(nn.Sequential(nn.Conv2d(I, O, 1)), lp.LavaConfig(r=r, alpha=r, target_modules="all-conv"))
    lora = lp.adapt(nn.Sequential(nn.Conv2d(I, O, 1)), lp.LoraConfig(r=r, alpha=r, target_modules="all-conv"))
    # (1) every increment of either has rank ≤ r
    for seed in range(5):
        for m in (lava, lora):
            _randomize(m, seed=seed)
            assert torch.linalg.matrix_rank(_adapter(m).delta_weight().reshape(O, I).double(), rtol=1e-5) <= r  # fp32 noise
    # (2) every rank-r matrix is reached by both: M = A B
    A, B = torch.randn(O, r), torch.randn(r, I)
    a, la = _adapter(lava), _adapter(lora)
    with torch.no_grad():
        a.lava_U.copy_(A)
        a.lava_V.copy_(B)
        for p in a.lava_P:
            p.fill_(1.0)
        factor_codec("lora").write(la, Factors(A, [B]))
    torch.testing.assert_close(a.delta_weight().reshape(O, I), A @ B)
    torch.testing.assert_close(la.delta_weight().reshape(O, I), A @ B)
    # (3) the spatial factors only rescale components: the same ΔW with P = 1 and U scaled
    _randomize(lava, seed=7)
    scale = a.lava_P[0][:, 0] * a.lava_P[1][:, 0]
    ref = (a.lava_U * scale) @ a.lava_V * a.scale
    torch.testing.assert_close(a.delta_weight().reshape(O, I), ref, rtol=1e-5, atol=1e-5)


def _two_tucker_adapters(conv):
    model = lp.adapt(nn.Sequential(conv), lp.LavaConfig(r=3, alpha=6, target_modules="all-conv",
                                                         factorization="tucker", orth_lambda=0.3))
    model.add_adapter("b", lp.LavaConfig(r=2, alpha=2, target_modules="all-conv", factorization="tucker"))
    _randomize(model, "default", 1)
    _randomize(model, "b", 2)
    return model


@pytest.mark.parametrize("conv", [lambda: nn.Conv2d(6, 8, 3), lambda: nn.Conv2d(4, 4, 3, groups=4),
                                  lambda: nn.Conv2d(3, 4, (3, 1))], ids=["dense", "depthwise", "modes_overflow"])
def test_tucker_linear_combination_is_exact_and_stays_tucker(conv):
    torch.manual_seed(0)
    model = _two_tucker_adapters(conv())
    d1, d2 = _adapter(model, "default").delta_weight(), _adapter(model, "b").delta_weight()
    rep = model.add_weighted_adapter(["default", "b"], [0.7, -1.5], "mix", combination_type="exact_linear")
    mix = _adapter(model, "mix")
    assert rep.method == "lava" and mix.tucker and model.peft_config["mix"].orth_lambda == 0.3
    torch.testing.assert_close(mix.delta_weight(), 0.7 * d1 - 1.5 * d2, rtol=1e-5, atol=1e-5)
    assert max(rep.relative_error.values()) < 1e-5
    O, I = mix.spec.out_dim, mix.spec.in_dim
    assert mix.lava_U.shape[1] <= O and mix.lava_V.shape[0] <= I  # mode ranks re-factored by QR


def test_tucker_svd_combination_refits_by_hosvd_and_cp_mixes_are_exact():
    torch.manual_seed(0)
    model = _two_tucker_adapters(nn.Conv2d(6, 8, 3))
    d1, d2 = _adapter(model, "default").delta_weight(), _adapter(model, "b").delta_weight()
    rep = model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "s5", combination_type="svd", svd_rank=5)
    torch.testing.assert_close(_adapter(model, "s5").delta_weight(), d1 + d2, rtol=1e-4, atol=1e-4)  # rank 3+2
    rep2 = model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "s2", combination_type="svd", svd_rank=2)
    assert _adapter(model, "s2").tucker and 0 < rep2.relative_error[next(iter(rep2.relative_error))] < 1
    assert rep.method == "lava"
    # CP + Tucker: a Tucker first input gives a Tucker result (superdiagonal core for the CP part), exact
    model.add_adapter("cp", lp.LavaConfig(r=2, alpha=2, target_modules="all-conv"))
    _randomize(model, "cp", 3)
    d3 = _adapter(model, "cp").delta_weight()
    model.add_weighted_adapter(["default", "cp"], [1.0, 2.0], "tc", combination_type="exact_linear")
    assert _adapter(model, "tc").tucker
    torch.testing.assert_close(_adapter(model, "tc").delta_weight(), d1 + 2 * d3, rtol=1e-5, atol=1e-5)
    # a CP first input cannot hold the Tucker part: the result is a LoRA (flattened), still exact
    rep3 = model.add_weighted_adapter(["cp", "default"], [2.0, 1.0], "ct", combination_type="exact_linear")
    assert rep3.method == "lora"
    torch.testing.assert_close(_adapter(model, "ct").delta_weight(), d1 + 2 * d3, rtol=1e-5, atol=1e-5)


def test_tucker_compress_and_hosvd_are_exact_where_they_should_be():
    torch.manual_seed(0)
    U, C, V = torch.randn(4, 7, dtype=torch.float64), torch.randn(7, 9, 3, 3, dtype=torch.float64), \
        torch.randn(9, 5, dtype=torch.float64)
    full = torch.einsum("oa,abkl,bi->oikl", U, C, V)
    U2, C2, V2 = tucker_compress(U, C, V)
    assert U2.shape == (4, 4) and V2.shape == (5, 5)
    torch.testing.assert_close(torch.einsum("oa,abkl,bi->oikl", U2, C2, V2), full)
    u, c, v = tucker_hosvd(full.float(), 4, 5)
    torch.testing.assert_close(torch.einsum("oa,abkl,bi->oikl", u, c, v).double(), full, rtol=1e-3, atol=1e-3)


def test_tucker_save_load_and_hotswap_roundtrip(tmp_path):
    from lava_peft.hotswap import hotswap_adapter

    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 8)
    model = _two_tucker_adapters(nn.Conv2d(6, 8, 3, padding=1))
    expected = model(x).detach()
    model.save_pretrained(str(tmp_path / "a"))
    copy_base = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1))
    copy_base[0].load_state_dict(model.model[0].base_layer.state_dict())
    loaded = lp.AdaptedModel.from_pretrained(copy_base, str(tmp_path / "a"))
    torch.testing.assert_close(loaded(x), expected)
    assert _adapter(loaded).tucker
    # hot-swap adapter "b" (rank 2) into the loaded rank-3 slot: padded, same outputs as "b"
    model.set_adapter("b")
    expected_b = model(x).detach()
    model.save_pretrained(str(tmp_path / "b"), adapter_name="b")
    hotswap_adapter(loaded, str(tmp_path / "b"), adapter_name="default")
    torch.testing.assert_close(loaded(x), expected_b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- probe
def test_gradient_variance_matches_hand_computation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    model = lp.adapt(net, lp.LavaConfig(r=2, target_modules=["0", "2"], orth_lambda=0.5))
    _randomize(model)
    batches = [(torch.randn(5, 3, 6, 6), torch.randint(0, 3, (5,))) for _ in range(4)]

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    first = next(p for p in model.parameters() if p.requires_grad)
    first.grad = torch.full_like(first, 7.0)
    res = gradient_variance(model, batches, loss_fn)
    assert torch.equal(first.grad, torch.full_like(first, 7.0))  # .grad left as it was
    # independent: per batch, backward into .grad, flatten per layer
    per_layer = {}
    for path, layer in [("0", model.model[0]), ("2", model.model[2])]:
        a = layer.adapters["default"]
        gs = []
        for b in batches:
            a.zero_grad(set_to_none=True)
            for p in model.parameters():
                p.grad = None
            loss_fn(model, b).backward()
            gs.append(torch.cat([p.grad.reshape(-1).double() for p in a.parameters()]))
        G = torch.stack(gs)
        per_layer[path] = (((G - G.mean(0)) ** 2).sum(1).sum().item() / 3, G.mean(0).pow(2).sum().item())
    assert res["batches"] == 4 and set(res["layers"]) == {"0", "2"}
    for path, (var, msq) in per_layer.items():
        assert res["layers"][path]["var"] == pytest.approx(var, rel=1e-9)
        assert res["layers"][path]["mean_sq"] == pytest.approx(msq, rel=1e-9)
    assert res["total"]["var"] == pytest.approx(sum(v for v, _ in per_layer.values()), rel=1e-9)
    assert set(res["layers"]["0"]["tensors"]) == {"lava_U", "lava_V", "lava_P.0", "lava_P.1"}
    with pytest.raises(LavaError, match="at least 2"):
        gradient_variance(model, batches[:1], loss_fn)


# ------------------------------------------------------------------ merged with main: hook, DoRA, PEFT types
def test_tucker_goes_through_effective_factors():
    """The Tucker-2 view of the hook is ``(U, [V, core], s)``; ΔW, the chain and the codec's read all use it."""
    from lava_peft.methods.factors import is_tucker_modes

    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Conv2d(6, 8, 3)), lp.LavaConfig(r=3, alpha=6, target_modules="all-conv",
                                                                        factorization="tucker"))
    _randomize(model)
    a = _adapter(model)
    up, modes, scale = a.effective_factors()
    assert up is a.lava_U and modes[0] is a.lava_V and modes[1] is a.lava_core and scale == a.scale
    assert is_tucker_modes(modes)
    torch.testing.assert_close(a.delta_from_factors(up, modes, scale), _tucker_einsum(a))
    f = factor_codec("lava").read(a)
    assert f.is_tucker and torch.equal(f.core, a.lava_core)
    torch.testing.assert_close(f.dense(a.spec.canonical_shape), _tucker_einsum(a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,make,shape", [CONVS[0], CONVS[2], CONVS[4]], ids=[CONVS[i][0] for i in (0, 2, 4)])
def test_dora_on_tucker_matches_the_weight_decomposed_formula(name, make, shape):
    torch.manual_seed(0)
    conv = make()
    x = torch.randn(*shape)
    base = make()
    base.load_state_dict(conv.state_dict())
    model = lp.adapt(nn.Sequential(base), lp.LavaConfig(r=3, alpha=6, target_modules="all-conv",
                                                          factorization="tucker", use_dora=True))
    a = _adapter(model)
    torch.testing.assert_close(a.dora_magnitude, conv.weight.reshape(conv.weight.shape[0], -1).norm(dim=1))
    _randomize(model)
    w = conv.weight + _tucker_einsum(a)
    ref_w = a.dora_magnitude.view(-1, *([1] * (w.dim() - 1))) * w / w.reshape(w.shape[0], -1).norm(dim=1).view(
        -1, *([1] * (w.dim() - 1)))
    ref = conv._conv_forward(x, ref_w, conv.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(x), ref, rtol=1e-4, atol=1e-4)


def test_tucker_in_peft_combination_types():
    """cat keeps the cores (exact); factor-wise types flatten to LoRA with PEFT's formula; svd_clamp gives LoRA."""
    torch.manual_seed(0)
    model = _two_tucker_adapters(nn.Conv2d(6, 8, 3))
    model.add_adapter("c", lp.LavaConfig(r=3, alpha=3, target_modules="all-conv", factorization="tucker"))
    _randomize(model, "c", 5)
    d1, d2 = _adapter(model, "default").delta_weight(), _adapter(model, "b").delta_weight()
    rep = model.add_weighted_adapter(["default", "b"], [0.5, 2.0], "cat", combination_type="cat")
    assert rep.method == "lava" and _adapter(model, "cat").tucker
    torch.testing.assert_close(_adapter(model, "cat").delta_weight(), 0.5 * d1 + 2.0 * d2, rtol=1e-5, atol=1e-5)
    # PEFT "linear" on equal ranks: A = Σ sgn(c)√|c| A_a, B = Σ √|c| B_a with the flattened Tucker factors
    rep = model.add_weighted_adapter(["default", "c"], [0.5, -2.0], "lin", combination_type="linear")
    assert rep.method == "lora"
    ref_a = ref_b = 0
    for n, w in (("default", 0.5), ("c", -2.0)):
        a = _adapter(model, n)
        down = torch.einsum("abkl,bi->aikl", a.lava_core, a.lava_V).reshape(a.lava_core.shape[0], -1)
        c = w * a.scale
        ref_a = ref_a + (abs(c) ** 0.5) * (1 if c >= 0 else -1) * down
        ref_b = ref_b + (abs(c) ** 0.5) * a.lava_U
    torch.testing.assert_close(_adapter(model, "lin").delta_weight().reshape(8, -1), ref_b @ ref_a,
                               rtol=1e-4, atol=1e-4)
    # ranks differ ("default" r=3, "b" r=2): refused, pointing to the exact types
    with pytest.raises(LavaConfigError, match="equal ranks"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "bad", combination_type="linear")
    # svd with PEFT's clamp: HOSVD cannot apply it, the result is a LoRA of rank svd_rank
    rep = model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "clamp", combination_type="svd", svd_rank=5,
                                     svd_clamp=1.0)
    assert rep.method == "lora" and _adapter(model, "clamp").r == 5
    u, s, vh = torch.linalg.svd((d1 + d2).reshape(8, -1).detach(), full_matrices=True)
    up, down = u[:, :5] * s[:5], vh[:5]
    high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 1.0)  # PEFT's clamp, written out
    ref = up.clamp(-high, high) @ down.clamp(-high, high)
    torch.testing.assert_close(_adapter(model, "clamp").delta_weight().reshape(8, -1), ref, rtol=1e-3, atol=1e-3)
