"""add_weighted_adapter: every combination type against independent computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import lava_peft as lp
from lava_peft.combine import cp_als
from test_contract import CONFIGS, LAYERS
from _tiny_models import randomize_adapters

PAIRS = [("lora", "lora"), ("lava", "lava"), ("lava", "lora"), ("lava_loranit_all", "lava_rslora_uniform")]


def _two_adapters(layer: str, m1: str, m2: str, seed: int = 0):
    torch.manual_seed(seed)
    make_layer, make_input = LAYERS[layer]
    model = lp.adapt(nn.Sequential(make_layer()), CONFIGS[m1](), "a")
    model.add_adapter("b", CONFIGS[m2]())
    randomize_adapters(model, seed)
    return model.eval(), make_input()


def _delta(model, name, path="0"):
    return model.model.get_submodule(path).adapters[name].delta_weight().detach()


@pytest.mark.parametrize("pair,layer", list(itertools.product(PAIRS, LAYERS)))
def test_exact_linear_is_the_exact_weighted_sum_and_stays_factored(pair, layer):
    m1, m2 = pair
    model, x = _two_adapters(layer, m1, m2)
    report = model.add_weighted_adapter(["a", "b"], [0.7, -1.3], "ab", "exact_linear")
    expected = 0.7 * _delta(model, "a") - 1.3 * _delta(model, "b")
    torch.testing.assert_close(_delta(model, "ab"), expected, rtol=1e-5, atol=1e-5)
    method1, method2 = CONFIGS[m1]().method, CONFIGS[m2]().method
    ra = model.model[0].adapters["a"].r
    rb = model.model[0].adapters["b"].r
    kind = model.model[0].spec.kind
    if method1 == method2:
        assert report.method == method1  # LAVA conv stays CP, LoRA stays LoRA
    else:
        assert report.method == "lora"  # a mix is a flattened LoRA (CP components are rank 1 there)
    limit = min(model.model[0].spec.out_dim, int(np.prod(model.model[0].spec.canonical_shape[1:])))
    if report.method == "lava" and kind == "conv":
        assert report.ranks["0"] == ra + rb
    else:
        assert report.ranks["0"] == min(ra + rb, limit)
    # with weights 1, 1 the combined adapter equals both adapters active at once
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "sum")  # the default type is exact_linear
    with torch.no_grad():
        model.set_adapter(["a", "b"])
        both = model(x)
        model.set_adapter("sum")
        combined = model(x)
    torch.testing.assert_close(combined, both, rtol=1e-4, atol=1e-5)


def test_lava_conv_exact_linear_concatenates_cp_components_exactly():
    model, _ = _two_adapters("conv2d_grouped", "lava", "lava")
    model.add_weighted_adapter(["a", "b"], [2.0, 0.5], "ab", "exact_linear")
    a, b, ab = (model.model[0].adapters[n] for n in ("a", "b", "ab"))
    # U columns are w·s·U of each input (scale of the result is 1), the other factors are stacked
    torch.testing.assert_close(ab.lava_U, torch.cat([2.0 * a.scale * a.lava_U, 0.5 * b.scale * b.lava_U], 1))
    torch.testing.assert_close(ab.lava_V, torch.cat([a.lava_V, b.lava_V], 0))
    for pa, pb, pab in zip(a.lava_P, b.lava_P, ab.lava_P):
        torch.testing.assert_close(pab, torch.cat([pa, pb], 0))
    assert ab.scale == 1.0


class _LinConvHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.conv = nn.Conv1d(2, 4, 3)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.body(x).view(x.shape[0], 2, 4)
        return self.head(self.conv(h).flatten(1))


def _lin_conv_head():
    torch.manual_seed(0)
    return _LinConvHead()


def test_combined_adapter_saves_loads_merges_and_keeps_modules_to_save(tmp_path):
    base = _lin_conv_head()
    model = lp.adapt(base, lp.LavaConfig(r=2, target_modules=["body.0", "conv"], modules_to_save=["head"]), "a")
    model.add_adapter("b", lp.LavaConfig(r=3, alpha=1, target_modules=["body.0"], modules_to_save=["head"]))
    randomize_adapters(model, 3)
    model.eval()
    model.add_weighted_adapter(["a", "b"], [0.25, 0.75], "ab")
    head = model.model.head
    orig = head.original_module.weight
    torch.testing.assert_close(
        head.copies["ab"].weight, orig + 0.25 * (head.copies["a"].weight - orig) + 0.75 * (head.copies["b"].weight - orig)
    )
    model.set_adapter("ab")
    x = torch.randn(5, 6)
    with torch.no_grad():
        out = model(x)
        model.save_pretrained(str(tmp_path), adapter_name="ab")
        loaded = lp.AdaptedModel.from_pretrained(_lin_conv_head(), str(tmp_path))
        torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)
        model.merge_adapter()
        torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
    assert model.peft_config["ab"].method == "lava"


def _eckart_young(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = np.linalg.svd(matrix.double().numpy(), full_matrices=False)
    return torch.from_numpy((u[:, :rank] * s[:rank]) @ vh[:rank])


@pytest.mark.parametrize("layer", ["linear", "embedding", "gpt2_conv1d", "conv2d_grouped"])
@pytest.mark.parametrize("pair", [("lora", "lora"), ("lava", "lora")])
def test_svd_is_the_best_rank_r_approximation(layer, pair):
    model, _ = _two_adapters(layer, *pair)
    report = model.add_weighted_adapter(["a", "b"], [0.6, 0.9], "svd", "svd", svd_rank=2)
    target = 0.6 * _delta(model, "a") + 0.9 * _delta(model, "b")
    got = _delta(model, "svd")
    ref = _eckart_young(target.reshape(target.shape[0], -1), 2).reshape(target.shape)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    assert report.ranks["0"] == 2
    assert report.relative_error["0"] == pytest.approx((ref - target.double()).norm().item() / target.norm().item(), rel=1e-3, abs=1e-6)


def test_svd_default_rank_is_the_largest_input_rank_and_lava_u_is_orthonormal():
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Linear(20, 16)), lp.LavaConfig(r=2, target_modules=["0"]), "a")
    model.add_adapter("b", lp.LavaConfig(r=4, target_modules=["0"]))
    randomize_adapters(model)
    report = model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "s", "svd")
    assert report.method == "lava" and report.ranks["0"] == 4
    u = model.model[0].adapters["s"].lava_U.detach()
    torch.testing.assert_close(u.T @ u, torch.eye(4), atol=1e-5, rtol=0)
    assert model.model[0].adapters["s"].regularization().item() < 1e-8
    # rank >= total rank: exact
    model.add_weighted_adapter(["a", "b"], [1.0, -2.0], "full", "svd", svd_rank=6)
    torch.testing.assert_close(_delta(model, "full"), _delta(model, "a") - 2 * _delta(model, "b"), atol=1e-5, rtol=1e-5)


def test_cp_als_recovers_an_exact_low_rank_tensor():
    gen = torch.Generator().manual_seed(0)
    factors = [torch.randn(d, 3, generator=gen, dtype=torch.float64) for d in (6, 5, 3, 3)]
    tensor = torch.einsum("az,bz,cz,dz->abcd", *factors)
    _, err = cp_als(tensor, 3, n_iter=500, tol=0)
    assert err < 1e-6
    _, err2 = cp_als(tensor, 2, n_iter=100)
    assert 0.01 < err2 < 1  # a rank-2 fit of a generic rank-3 tensor cannot be exact


def test_svd_on_conv_lava_refits_cp_and_beats_its_initial_truncation():
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Conv2d(6, 8, 3)), lp.LavaConfig(r=3, target_modules=["0"]), "a")
    model.add_adapter("b", lp.LavaConfig(r=3, target_modules=["0"]))
    randomize_adapters(model)
    target = 0.5 * _delta(model, "a") + 0.5 * _delta(model, "b")
    report = model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "cp", "svd", svd_rank=4)
    assert report.method == "lava"
    ad = model.model[0].adapters["cp"]
    assert ad.lava_U.shape == (8, 4) and ad.lava_V.shape == (4, 6) and [p.shape for p in ad.lava_P] == [(4, 3), (4, 3)]
    err = ((_delta(model, "cp") - target).norm() / target.norm()).item()
    assert err == pytest.approx(report.relative_error["0"], rel=1e-4)
    # ALS starts from the 4 largest concatenated components and never increases the error
    comps = []
    for name in ("a", "b"):
        a = model.model[0].adapters[name]
        for j in range(3):
            comp = 0.5 * a.scale * torch.einsum("o,i,k,l->oikl", a.lava_U[:, j], a.lava_V[j], a.lava_P[0][j], a.lava_P[1][j])
            comps.append(comp.detach())
    comps.sort(key=lambda c: -c.norm().item())
    init_err = ((sum(comps[:4]) - target).norm() / target.norm()).item()
    assert err <= init_err + 1e-6
    assert err < 0.5
    # total CP rank <= svd_rank: the exact concatenation (zero-padded)
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "cp8", "svd", svd_rank=8)
    torch.testing.assert_close(_delta(model, "cp8"), target, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ TIES / DARE / magnitude: reference
def _ref_topk(t: np.ndarray, density: float) -> np.ndarray:
    k = int(density * t.size)
    flat = t.ravel().copy()
    order = np.argsort(-np.abs(flat), kind="stable")
    keep = np.zeros(flat.size, bool)
    keep[order[:k]] = True
    return np.where(keep, flat, 0.0).reshape(t.shape)


def _ref_combine(taus, weights, kind, density, gen=None, sign_method="total"):
    """Independent numpy TIES/DARE/magnitude rules; DARE masks drawn as PEFT does (bernoulli, per tensor)."""
    taus = [t.double().numpy() for t in taus]
    if kind in ("ties", "magnitude_prune"):
        pruned = [_ref_topk(t, density) for t in taus]
    else:
        pruned = []
        for t in taus:
            keep = torch.bernoulli(torch.full(t.shape, density), generator=gen).double().numpy()
            pruned.append(t * keep / density)
    if kind in ("magnitude_prune", "dare_linear"):
        return sum(w * p for w, p in zip(weights, pruned))
    total = sum(pruned) if sign_method == "total" else sum(np.sign(p) for p in pruned)
    majority = np.where(total >= 0, 1.0, -1.0)
    num = np.zeros_like(pruned[0])
    cnt = np.zeros_like(pruned[0])
    for w, p in zip(weights, pruned):
        agree = np.sign(p) == majority
        num += w * p * agree
        cnt += agree
    return num / np.maximum(cnt, 1)


@pytest.mark.parametrize("kind", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_pruned_svd_types_on_dense_deltas_match_a_reference_implementation(kind, sign_method):
    """``<rule>_svd`` with ``result_method="dense_delta"``: the rule on the dense ``ΔW_a`` without a refit
    (what ``ties`` etc. meant before they took PEFT's factor-wise meaning), mixed ranks and methods."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 9), nn.Conv2d(3, 4, 3), nn.Embedding(12, 5))
    model = lp.adapt(net, lp.LoraConfig(r=2, target_modules=["0", "1", "2"]), "a")
    model.add_adapter("b", lp.LavaConfig(r=3, target_modules=["0", "1"]))
    model.add_adapter("c", lp.LavaConfig(r=1, target_modules=["0", "2"]))
    randomize_adapters(model, 5)
    names, weights, density = ["a", "b", "c"], [0.5, 1.5, -0.8], 0.4
    report = model.add_weighted_adapter(names, weights, "m", kind + "_svd", density=density, seed=7,
                                        majority_sign_method=sign_method, result_method="dense_delta")
    assert report.method == "dense_delta"
    gen = torch.Generator().manual_seed(7)
    for path in ("0", "1", "2"):  # model order; adapters absent from a layer draw nothing
        layer = model.model.get_submodule(path)
        present = [n for n in names if n in layer.adapters]
        # the embedding's ΔW is combined in the layer's own layout (num_embeddings, dim), as PEFT's
        # get_delta_weight returns it: the DARE mask entries are drawn in that order
        flip = (lambda t: t.T) if path == "2" else (lambda t: t)
        taus = [flip(layer.adapters[n].delta_weight().detach()) for n in present]
        ref = flip(_ref_combine(taus, [weights[names.index(n)] for n in present], kind, density, gen, sign_method))
        got = layer.adapters["m"].delta_weight().detach().double().numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
        if kind in ("ties", "magnitude_prune"):  # at most density of each input survives
            assert (got != 0).sum() <= sum(int(density * t.numel()) for t in taus)


def test_dare_is_seeded_and_ties_svd_refits_low_rank():
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Linear(12, 10)), lp.LoraConfig(r=3, target_modules=["0"]), "a")
    model.add_adapter("b", lp.LoraConfig(r=3, target_modules=["0"]))
    randomize_adapters(model)
    model.add_weighted_adapter(["a", "b"], [1, 1], "d1", "dare_linear", density=0.5, seed=1)
    model.add_weighted_adapter(["a", "b"], [1, 1], "d2", "dare_linear", density=0.5, seed=1)
    model.add_weighted_adapter(["a", "b"], [1, 1], "d3", "dare_linear", density=0.5, seed=2)
    assert torch.equal(_delta(model, "d1"), _delta(model, "d2"))
    assert not torch.equal(_delta(model, "d1"), _delta(model, "d3"))
    model.add_weighted_adapter(["a", "b"], [1, 1], "t", "ties_svd", density=0.5, result_method="dense_delta")
    report = model.add_weighted_adapter(["a", "b"], [1, 1], "t2", "ties_svd", density=0.5, svd_rank=2)
    assert report.method == "lora" and model.model[0].adapters["t2"].lora_A.shape == (2, 12)
    ref = _eckart_young(_delta(model, "t"), 2)
    torch.testing.assert_close(_delta(model, "t2").double(), ref, atol=1e-5, rtol=1e-4)


def test_methods_without_factors_combine_densely(tmp_path):
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Linear(6, 5)), lp.LoraConfig(r=2, target_modules=["0"]), "a")
    model.add_adapter("b", lp.LoraConfig(r=2, target_modules=["0"]))
    randomize_adapters(model)
    model.add_weighted_adapter(["a", "b"], [1, 1], "t", "ties_svd", density=0.6, result_method="dense_delta")
    report = model.add_weighted_adapter(["t", "a"], [0.5, 2.0], "mix")
    assert report.method == "dense_delta"
    torch.testing.assert_close(_delta(model, "mix"), 0.5 * _delta(model, "t") + 2 * _delta(model, "a"))
    with pytest.raises(lp.LavaConfigError, match="svd_rank"):
        model.add_weighted_adapter(["t", "a"], [1, 1], "s", "svd")
    report = model.add_weighted_adapter(["t", "a"], [1, 1], "s", "svd", svd_rank=5)
    assert report.method == "lora"
    torch.testing.assert_close(_delta(model, "s"), _delta(model, "t") + _delta(model, "a"), atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 6)
    model.set_adapter("mix")
    model.save_pretrained(str(tmp_path), adapter_name="mix")
    with torch.no_grad():
        out = model(x)
        torch.manual_seed(0)
        loaded = lp.AdaptedModel.from_pretrained(nn.Sequential(nn.Linear(6, 5)), str(tmp_path))
        torch.testing.assert_close(loaded(x), out)


def _snapshot(model):
    return (sorted(model.peft_config), [sorted(layer.adapters) for layer in model.modules() if isinstance(layer, lp.AdaptedLayer)])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(adapters=["a", "zz"], weights=[1, 1]), lp.AdapterNameError, "zz"),
        (dict(adapters=["a", "b"], weights=[1]), lp.LavaConfigError, "one weight each"),
        (dict(adapters=["a", "b"], weights=[1, float("nan")]), lp.LavaConfigError, "finite"),
        (dict(adapters=["a", "b"], weights=[1, 1], combination_type="concat"), lp.LavaConfigError, "unknown"),
        (dict(adapters=["a", "b"], weights=[1, 1], combination_type="ties", density=0.5, svd_rank=2),
         lp.LavaConfigError, "SVD types"),
        (dict(adapters=["a", "b"], weights=[1, 1], combination_type="svd", svd_clamp=1.5), lp.LavaConfigError, "quantile"),
        (dict(adapters=["a", "b"], weights=[1, 1], combination_type="svd", svd_driver="gesvd"), lp.LavaConfigError, "CUDA"),
        (dict(adapters=["a", "c"], weights=[1, 1], combination_type="linear"), lp.LavaConfigError, "equal ranks"),
        (dict(adapters=["a", "b"], weights=[1, 1], combination_type="ties"), lp.LavaConfigError, "density"),
        (dict(adapters=["a", "b"], weights=[1, 1], combination_type="ties", density=1.5), lp.LavaConfigError, "density"),
        (dict(adapters=["a", "b"], weights=[1, 1], density=0.5), lp.LavaConfigError, "density"),
        (dict(adapters=["a", "b"], weights=[1, 1], result_method="lava"), lp.LavaConfigError, "cannot represent"),
        (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="a"), lp.AdapterNameError, "already exists"),
    ],
)
def test_bad_arguments_raise_clear_errors_and_leave_the_model_unchanged(kwargs, error, match):
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Conv2d(3, 4, 3)), lp.LavaConfig(r=2, target_modules=["0"]), "a")
    model.add_adapter("b", lp.LoraConfig(r=2, target_modules=["0"]))
    model.add_adapter("c", lp.LoraConfig(r=3, target_modules=["0"]))
    before = _snapshot(model)
    kwargs = dict(kwargs)
    args = (kwargs.pop("adapters"), kwargs.pop("weights"), kwargs.pop("adapter_name", "new"))
    with pytest.raises(error, match=match):
        model.add_weighted_adapter(*args, **kwargs)
    assert _snapshot(model) == before
