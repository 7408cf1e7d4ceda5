"""Low-bit adapters: the quantizer, bit packing, packed files, and 1-bit LoRA / LAVA end to end.

Expected values come from independent computations written here: the Gaussian codebook
from ``math.erf`` with scalar bisection, fake quantization by hand in float64, bit packing
through Python integers, and the saved file decoded without the library.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import struct

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lava_peft as lp
import lava_peft.methods.lowbit  # noqa: F401  (registers "lowbit")
from lava_peft.errors import AdapterFileError, LavaConfigError, LavaError
from lava_peft.adapter_files import write_adapter_dir
from lava_peft.lowbit import (
    adapter_storage_bytes,
    dequantize_from_storage,
    fake_quantize,
    gaussian_codebook,
    pack_codes,
    quantize,
    quantize_for_storage,
    unpack_codes,
)
from lava_peft.methods.lava import LavaAdapter
from lava_peft.methods.lowbit import LowBitAdapter, LowBitConfig, LowBitLavaAdapter, LowBitLoraAdapter


# ----------------------------------------------------------------------------- independent helpers
def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _bisect(f, lo: float, hi: float, steps: int = 200) -> float:
    """Root of an increasing ``f`` on [lo, hi]."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def _phi_inv(p: float) -> float:
    return _bisect(lambda x: _phi(x) - p, -40.0, 40.0)


def _median_levels_2bit() -> tuple[float, float]:
    """k = 2, by symmetry levels ±a, ±b and thresholds 0, ±m: a, b are the medians of N(0,1) on
    [0, m] and [m, ∞), and m = (a + b)/2 — one scalar equation in m."""

    def levels(m):
        return _phi_inv((0.5 + _phi(m)) / 2), _phi_inv((_phi(m) + 1.0) / 2)

    m = _bisect(lambda m: m - sum(levels(m)) / 2, 0.1, 3.0, steps=80)
    return levels(m)


def _py_pack(codes: list[int], bits: int) -> list[int]:
    """Little-endian bit stream through one Python integer: code i at bit i·bits."""
    acc = 0
    for i, c in enumerate(codes):
        acc |= c << (i * bits)
    return list(acc.to_bytes((len(codes) * bits + 7) // 8, "little"))


def _py_decode(packed: torch.Tensor, stats: torch.Tensor, shape, levels) -> torch.Tensor:
    """A saved factor decoded without the library (float64)."""
    bits = int(math.log2(len(levels)))
    n = math.prod(shape)
    acc = int.from_bytes(bytes(packed.tolist()), "little")
    codes = [(acc >> (i * bits)) & (2**bits - 1) for i in range(n)]
    mu, sigma = stats.tolist()
    return torch.tensor([levels[c] * sigma + mu for c in codes], dtype=torch.float64).view(*shape)


def _train(model, x, steps=5, lr=1e-2, seed=1):
    torch.manual_seed(seed)
    target = torch.randn_like(model(x).detach())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - target).pow(2).mean() + model.regularization_loss()
        loss.backward()
        opt.step()


# ----------------------------------------------------------------------------- codebook
def test_codebook_levels_match_independent_gaussian_medians():
    one = gaussian_codebook(1)
    q3 = _phi_inv(0.75)
    assert q3 == pytest.approx(0.6744897501960817, abs=1e-12)  # ±Φ⁻¹(0.75), the paper's 1-bit level
    assert one.levels == pytest.approx((-q3, q3), abs=1e-12) and one.thresholds == (0.0,)
    a, b = _median_levels_2bit()
    assert (a, b) == pytest.approx((0.37775, 1.26572), abs=1e-5)  # median rule (Lloyd–Max would be 0.4528, 1.510)
    two = gaussian_codebook(2)
    assert two.levels == pytest.approx((-b, -a, a, b), abs=1e-9)
    assert two.thresholds == pytest.approx((-(a + b) / 2, 0.0, (a + b) / 2), abs=1e-9)
    for bits in range(1, 9):
        book = gaussian_codebook(bits)
        lv, th = book.levels, book.thresholds
        assert len(lv) == 2**bits and len(th) == 2**bits - 1
        assert all(x < y for x, y in zip(lv, lv[1:]))
        assert lv == tuple(-v for v in reversed(lv))  # exactly antisymmetric
        assert th == pytest.approx([(x + y) / 2 for x, y in zip(lv, lv[1:])], abs=1e-15)
        edges = [0.0] + [_phi(t) for t in th] + [1.0]  # each level is the median of its bin
        for i, level in enumerate(lv):
            assert _phi(level) == pytest.approx((edges[i] + edges[i + 1]) / 2, abs=1e-12), (bits, i)
    assert gaussian_codebook(3) is gaussian_codebook(3)


# ----------------------------------------------------------------------------- fake quantization
@pytest.mark.parametrize("bits", [1, 2])
def test_fake_quantize_equals_hand_computation(bits):
    values = [0.3, -1.2, 2.0, 0.5, -0.1, 0.0, 0.9, -0.45]
    mu, sigma = statistics.fmean(values), statistics.stdev(values)
    if bits == 1:
        levels, thresholds = [-_phi_inv(0.75), _phi_inv(0.75)], [0.0]
    else:
        a, b = _median_levels_2bit()
        levels, thresholds = [-b, -a, a, b], [-(a + b) / 2, 0.0, (a + b) / 2]
    z = [(v - mu) / sigma for v in values]
    codes = [sum(t <= zi for t in thresholds) for zi in z]
    expected = torch.tensor([levels[c] * sigma + mu for c in codes], dtype=torch.float32)
    w = torch.tensor(values)
    got_codes, stats = quantize(w, bits)
    assert got_codes.tolist() == codes
    assert stats.tolist() == pytest.approx([mu, sigma], rel=1e-6)
    torch.testing.assert_close(fake_quantize(w, bits), expected, rtol=1e-6, atol=1e-6)
    assert len(set(fake_quantize(torch.randn(50), bits).tolist())) <= 2**bits


def test_fake_quantize_gradient_is_the_straight_through_estimator():
    torch.manual_seed(0)
    w = torch.randn(4, 6, requires_grad=True)
    g = torch.randn(4, 6)
    (fake_quantize(w, 2, stats_grad=False) * g).sum().backward()
    assert torch.equal(w.grad, g)  # identity
    # default: Q is the identity in the backward, σ and μ are differentiated (the reference code's
    # w̃ + (Q(w̃) − w̃).detach()), compared with autograd in float64
    w.grad = None
    (fake_quantize(w, 2) * g).sum().backward()
    w64 = w.detach().double().requires_grad_()
    mu, sigma = w64.mean(), w64.std()
    z = (w64 - mu) / sigma
    codes, _ = quantize(w, 2)
    q = torch.tensor(gaussian_codebook(2).levels, dtype=torch.float64)[codes.long()]
    ((z + (q - z).detach()) * sigma + mu).mul(g.double()).sum().backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(w.grad, g)  # the σ term is really there


def test_constant_zero_and_single_element_tensors_do_not_divide_by_zero():
    for bits in (1, 3):
        for value in (0.0, 0.25, -3.0):
            w = torch.full((2, 5), value, requires_grad=True)
            out = fake_quantize(w, bits)
            assert torch.equal(out, w.detach())  # σ = 0: every element is μ
            out.sum().backward()
            assert torch.equal(w.grad, torch.ones_like(w))
        single = torch.tensor([1.7], requires_grad=True)
        assert torch.equal(fake_quantize(single, bits), single.detach())
        packed = quantize_for_storage(torch.zeros(3, 3), bits)
        assert packed.sigma.item() == 0.0
        assert torch.equal(dequantize_from_storage(*packed, bits=bits), torch.zeros(3, 3))


# ----------------------------------------------------------------------------- packing / storage
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip_and_layout(bits):
    gen = torch.Generator().manual_seed(bits)
    for n in (1, 3, 7, 8, 13, 37, 250):
        codes = torch.randint(0, 2**bits, (n,), generator=gen)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape == ((n * bits + 7) // 8,)
        assert packed.tolist() == _py_pack(codes.tolist(), bits)
        assert torch.equal(unpack_codes(packed, bits, n), codes.to(torch.uint8))
    grid = torch.randint(0, 2**bits, (3, 5), generator=gen)  # row-major flattening
    assert pack_codes(grid, bits).tolist() == _py_pack(grid.flatten().tolist(), bits)


def test_storage_round_trip_equals_fake_quantize_exactly():
    torch.manual_seed(0)
    w = torch.randn(5, 7) * 0.3 + 0.1
    for bits in range(1, 9):
        packed, mu, sigma, shape = quantize_for_storage(w, bits)
        assert packed.numel() == (35 * bits + 7) // 8 and mu.dtype == sigma.dtype == torch.float32
        assert shape == w.shape
        assert torch.equal(dequantize_from_storage(packed, mu, sigma, shape, bits), fake_quantize(w, bits))


def test_bad_arguments_give_clear_errors():
    for bits in (0, 9, 1.5, True, "1"):
        with pytest.raises(LavaConfigError, match="bits must be an integer from 1 to 8"):
            LowBitConfig(target_modules=["0"], bits=bits)
        with pytest.raises(LavaConfigError, match="bits must be an integer from 1 to 8"):
            fake_quantize(torch.randn(3), bits)
    with pytest.raises(LavaConfigError, match="bits must be"):
        gaussian_codebook(9)
    with pytest.raises(LavaConfigError, match=r"codes must lie in 0\.\.3"):
        pack_codes(torch.tensor([0, 4]), 2)
    with pytest.raises(LavaConfigError, match="integer tensor"):
        pack_codes(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(LavaConfigError, match="take 2 bytes, but 3"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 5)
    for field, value, match in [
        ("factorization", "tucker", "'lora' or 'lava'"),
        ("quantize", "both", "'all', 'up' or 'down'"),
        ("init", "zero", "'zero_delta' or 'paper'"),
        ("factor_init", "orthogonal", "factor_init for factorization='lora'"),
        ("orth_lambda", 0.1, "factorization='lava' only"),
    ]:
        with pytest.raises(LavaConfigError, match=match):
            LowBitConfig(target_modules=["0"], **{field: value})
    with pytest.raises(LavaConfigError, match="LowBitConfig.*conv_path"):
        LowBitConfig(target_modules=["0"], factorization="lava", conv_path="fast")


# ----------------------------------------------------------------------------- adapters
def test_config_json_round_trip_and_adapter_classes():
    cfg = LowBitConfig(target_modules=["0"], bits=3, factorization="lava", quantize="up", keep_latent=True)
    assert "lowbit" in lp.registered_methods()
    assert LowBitConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    lin = lp.adapt(nn.Sequential(nn.Linear(6, 5)), LowBitConfig(target_modules=["0"], r=2))
    conv = lp.adapt(nn.Sequential(nn.Conv2d(3, 4, 3)), cfg)
    a, b = lin.adapter_layers()[0][1], conv.adapter_layers()[0][1]
    assert type(a) is LowBitLoraAdapter and type(b) is LowBitLavaAdapter
    assert isinstance(a, LowBitAdapter) and isinstance(b, LavaAdapter)
    assert a.quantized_keys == ("lora_B", "lora_A") and b.quantized_keys == ("lava_U",)


def test_init_zero_delta_and_paper():
    torch.manual_seed(0)
    x = torch.randn(4, 12)
    base = nn.Sequential(nn.Linear(12, 10))
    model = lp.adapt(copy.deepcopy(base), LowBitConfig(r=2, target_modules=["0"]))
    adapter = model.adapter_layers()[0][1]
    assert torch.count_nonzero(adapter.delta_weight()) == 0 and torch.equal(model(x), base(x))
    # the zero factor's first gradient is the plain one (σ = 0 ⇒ identity); after one step it is 1-bit
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).pow(2).sum().backward()
    grad_b = adapter.latent_factor("lora_B").grad.clone()
    assert torch.count_nonzero(grad_b) > 0
    opt.step()
    torch.testing.assert_close(adapter.latent_factor("lora_B").detach(), -0.1 * grad_b, rtol=1e-6, atol=0)
    up, (down,), _ = adapter.effective_factors()  # the factors in use: 1-bit, two values each
    assert len(torch.unique(up)) == 2 and torch.equal(up, fake_quantize(adapter.latent_factor("lora_B"), 1))

    paper = lp.adapt(copy.deepcopy(base), LowBitConfig(r=2, target_modules=["0"], init="paper"))
    pa = paper.adapter_layers()[0][1]
    b_latent = pa.latent_factor("lora_B").detach()
    assert torch.count_nonzero(b_latent) == b_latent.numel() and b_latent.abs().max() <= 2e-3
    assert torch.count_nonzero(pa.delta_weight()) > 0 and not torch.equal(paper(x), base(x))  # ΔW ≠ 0 at init
    down = lp.adapt(copy.deepcopy(base), LowBitConfig(r=2, target_modules=["0"], init="paper", quantize="down"))
    assert torch.count_nonzero(down.adapter_layers()[0][1].delta_weight()) == 0  # fp32 B stays 0

    lava = lp.adapt(nn.Sequential(nn.Conv2d(3, 4, 3)), LowBitConfig(r=2, target_modules=["0"], factorization="lava",
                                                                    init="paper"))
    la = lava.adapter_layers()[0][1]
    assert la.latent_factor("lava_V").abs().max() <= 2e-3 and torch.count_nonzero(la.latent_factor("lava_V")) == 6
    torch.testing.assert_close(la.latent_factor("lava_U").T @ la.latent_factor("lava_U"), torch.eye(2))  # untouched


def test_one_bit_lora_linear_save_load_is_bit_exact(tmp_path, one_thread):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10))
    fresh, pristine = copy.deepcopy(base), copy.deepcopy(base)
    x = torch.randn(6, 12)
    model = lp.adapt(base, LowBitConfig(r=3, alpha=6, target_modules=["0"]))
    _train(model, x)
    adapter = model.adapter_layers()[0][1]
    down, up, scale = adapter.linear_factors()  # what the fused Linear node receives
    assert torch.equal(down, fake_quantize(adapter.latent_factor("lora_A"), 1))
    assert torch.equal(up, fake_quantize(adapter.latent_factor("lora_B"), 1))
    assert len(torch.unique(down)) == 2 and len(torch.unique(up)) == 2
    assert "LowRankLinear" in model(x).grad_fn.name()  # the fused node runs
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.save_pretrained(tmp_path)

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(tensors) == [f"0.lora_{f}.{s}" for f in "AB" for s in ("codes", "shape", "stats")]
    assert tensors["0.lora_A.codes"].dtype == torch.uint8 and tensors["0.lora_A.codes"].numel() == math.ceil(3 * 12 / 8)
    assert tensors["0.lora_B.shape"].tolist() == [10, 3]
    levels = gaussian_codebook(1).levels
    a = _py_decode(tensors["0.lora_A.codes"], tensors["0.lora_A.stats"], (3, 12), levels)
    b = _py_decode(tensors["0.lora_B.codes"], tensors["0.lora_B.stats"], (10, 3), levels)

    loaded = lp.AdaptedModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), before)
        la = loaded.adapter_layers()[0][1]
        assert la.is_frozen("lora_A") and la.is_frozen("lora_B")
        torch.testing.assert_close(la.delta_weight().double(), 2.0 * b @ a)  # s = alpha / r
        loaded.merge_adapter()
        torch.testing.assert_close(loaded(x), before, rtol=1e-5, atol=1e-5)
        loaded.unmerge_adapter()
        torch.testing.assert_close(loaded(x), before, rtol=1e-5, atol=1e-6)
    loaded.save_pretrained(tmp_path / "again")  # re-saving a loaded adapter gives the same tensors
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert again.keys() == tensors.keys()
    assert all(again[k].dtype == v.dtype and torch.equal(again[k], v) for k, v in tensors.items())

    trainable = lp.AdaptedModel.from_pretrained(pristine, tmp_path, is_trainable=True)
    with pytest.raises(LavaError, match="keep_latent=True"):
        trainable(x).sum().backward()


@pytest.mark.parametrize("conv_path", ["separable", "weight"])
def test_lava_conv_cp_save_load_is_bit_exact(tmp_path, one_thread, conv_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    fresh = copy.deepcopy(base)
    x = torch.randn(2, 4, 7, 7)
    cfg = LowBitConfig(r=3, alpha=3, bits=2, factorization="lava", target_modules=["0"], conv_path=conv_path,
                       orth_lambda=0.05)
    model = lp.adapt(base, cfg)
    assert torch.equal(model(x), fresh(x))
    _train(model, x)
    model.eval()
    adapter = model.adapter_layers()[0][1]
    with torch.no_grad():
        before = model(x)
        keys = ("lava_U", "lava_V", "lava_P.0", "lava_P.1")
        u, v, p0, p1 = (fake_quantize(adapter.latent_factor(k), 2) for k in keys)
        expected = torch.einsum("oj,ji,ja,jb->oiab", u, v, p0, p1)  # scale alpha / r = 1
        torch.testing.assert_close(adapter.delta_weight(), expected, rtol=1e-5, atol=1e-6)
        assert all(len(torch.unique(f)) <= 4 for f in (u, v, p0, p1))
    model.save_pretrained(tmp_path)
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == sorted(f"0.{f}.{s}" for f in ("lava_U", "lava_V", "lava_P.0", "lava_P.1")
                          for s in ("codes", "stats", "shape"))
    loaded = lp.AdaptedModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), before)
        loaded.merge_adapter()
        torch.testing.assert_close(loaded(x), before, rtol=1e-5, atol=1e-5)


def test_keep_latent_resumes_training_exactly_and_quantize_subset(tmp_path, one_thread):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6))
    fresh = copy.deepcopy(base)
    x = torch.randn(5, 8)
    model = lp.adapt(base, LowBitConfig(r=2, bits=2, target_modules=["0"], quantize="up", keep_latent=True))
    _train(model, x, steps=3)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["0.lora_A"].dtype == torch.float32  # not quantized: stored as usual
    assert {"0.lora_B", "0.lora_B.codes", "0.lora_B.stats", "0.lora_B.shape"} <= set(tensors)
    assert "0.lora_A.codes" not in tensors
    resumed = lp.AdaptedModel.from_pretrained(fresh, tmp_path, is_trainable=True)
    assert not resumed.adapter_layers()[0][1].is_frozen("lora_B")
    for m in (model, resumed):
        _train(m, x, steps=1, seed=7)
    with torch.no_grad():
        assert torch.equal(resumed(x), model(x))


def test_loaded_adapters_hot_swap_combine_and_deepcopy(tmp_path, one_thread):
    from lava_peft.hotswap import hotswap_adapter

    torch.manual_seed(0)
    pristine = nn.Sequential(nn.Linear(12, 10))
    x = torch.randn(4, 12)
    trained = []
    for seed in (1, 2):
        model = lp.adapt(copy.deepcopy(pristine), LowBitConfig(r=2, target_modules=["0"]))
        _train(model, x, seed=seed)
        model.save_pretrained(tmp_path / str(seed))
        with torch.no_grad():
            trained.append(model.eval()(x))
    served = lp.AdaptedModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "1")
    hotswap_adapter(served, str(tmp_path / "2"))  # in place into the frozen codes
    with torch.no_grad():
        assert torch.equal(served(x), trained[1])
        assert torch.equal(copy.deepcopy(served)(x), trained[1])
    served.load_adapter(str(tmp_path / "1"), "one")
    served.add_weighted_adapter(["default", "one"], [0.5, 0.5], "mix")
    served.set_adapter("mix")
    with torch.no_grad():
        expected = pristine(x) + 0.5 * (trained[0] - pristine(x)) + 0.5 * (trained[1] - pristine(x))
        torch.testing.assert_close(served(x), expected, rtol=1e-5, atol=1e-6)


def test_file_size_one_bit_is_about_one_32nd_of_fp32_lora(tmp_path, one_thread):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(1024, 1024))
    sizes = {}
    for name, cfg in [("lora", lp.LoraConfig(r=16, target_modules=["0"])),
                      ("lowbit", LowBitConfig(r=16, bits=1, target_modules=["0"]))]:
        model = lp.adapt(copy.deepcopy(base), cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_()
        model.save_pretrained(tmp_path / name)
        data = (tmp_path / name / "adapter_model.safetensors").read_bytes()
        header = struct.unpack("<Q", data[:8])[0]
        sizes[name] = (len(data), len(data) - 8 - header, adapter_storage_bytes(model))
    (lora_file, lora_payload, lora_acc), (bit_file, bit_payload, bit_acc) = sizes["lora"], sizes["lowbit"]
    assert lora_payload == lora_acc["tensor_bytes"] == 2 * 16 * 1024 * 4
    # 2 factors x (16·1024 bits + fp32 [μ, σ] + int64 shape (2,))
    assert bit_payload == bit_acc["tensor_bytes"] == 2 * (16 * 1024 // 8 + 8 + 16)
    assert lora_acc["bits_per_param"] == 32.0 and bit_acc["bits_per_param"] == pytest.approx(1.0117, abs=1e-4)
    assert bit_payload / lora_payload == pytest.approx(1 / 32, rel=0.02)
    assert 1 / 32 < bit_file / lora_file < 1 / 32 * 1.25  # whole files, JSON headers included


def test_half_precision_model_keeps_fp32_factors_and_stats(tmp_path, one_thread):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6))
    fresh = copy.deepcopy(base)
    x = torch.randn(3, 8)
    model = lp.adapt(base, LowBitConfig(r=2, target_modules=["0"]))
    _train(model, x, steps=2)
    model.save_pretrained(tmp_path)
    loaded = lp.AdaptedModel.from_pretrained(fresh, tmp_path)
    state = {k: v.clone() for k, v in loaded.adapter_state_dict().items()}
    loaded.to(torch.bfloat16)
    after = loaded.adapter_state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in state.items())
    assert all(p.dtype == torch.float32 for n, p in loaded.named_parameters() if ".adapters." in n)
    model.to(torch.bfloat16)
    with torch.no_grad():
        out = loaded(x.bfloat16())
        assert out.dtype == torch.bfloat16 and torch.equal(out, model(x.bfloat16()))


def test_corrupt_packed_file_is_refused_before_the_model_changes(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6))
    model = lp.adapt(copy.deepcopy(base), LowBitConfig(r=2, target_modules=["0"]))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    good = load_file(str(path))
    payload = json.loads((tmp_path / "adapter_config.json").read_text())
    for key, bad, match in [("0.lora_A.codes", good["0.lora_A.codes"].float(), "codes must be uint8"),
                            ("0.lora_B.stats", torch.tensor([0.0, float("nan")]), "not finite"),
                            ("0.lora_B.shape", torch.tensor([3, 4]), r"shape must be int64 \[6, 2\]")]:
        # written as one consistent folder (manifest included), so the loader reads exactly these tensors
        write_adapter_dir(tmp_path, payload, {**good, key: bad})
        target = lp.AdaptedModel(copy.deepcopy(base))
        with pytest.raises(AdapterFileError, match=match):
            target.load_adapter(str(tmp_path))
        assert target.peft_config == {} and not target.adapter_layers("default")


# ----------------------------------------------------------------------------- real weights
@pytest.mark.integration
def test_minilm_one_bit_lora_on_query_value_lowers_the_loss(one_thread):
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lava_peft.train.tasks import minilm_path

    path = minilm_path()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(0)
        net = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    finally:
        transformers.logging.set_verbosity(verbosity)
    model = lp.adapt(net, LowBitConfig(r=4, alpha=8, bits=1, target_modules=["query", "value"]))
    assert len(model.adapter_layers()) == 12
    batch = tok(["a gripping, beautifully acted film", "a tedious mess", "wonderful and moving",
                 "dull, lifeless and far too long"], return_tensors="pt", padding=True)
    labels = torch.tensor([1, 0, 1, 0])
    model.eval()
    with torch.no_grad():
        first = model(**batch, labels=labels).loss.item()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(8):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        last = model(**batch, labels=labels).loss.item()
    assert last < first - 0.05
    for _, adapter in model.adapter_layers():  # really 1-bit factors
        up, (down,), _ = adapter.effective_factors()
        assert len(torch.unique(down)) == 2 and len(torch.unique(up)) == 2
    assert adapter_storage_bytes(model)["bits_per_param"] == pytest.approx(1.125)  # (1536 + 64 + 128 bits) / 1536


@pytest.mark.parametrize("keep_latent", [True, False])
def test_trainer_checkpoint_restores_the_adapter_in_place(tmp_path, one_thread, keep_latent):
    """``load_trainable`` (Trainer resume) goes through the adapter's own loader.

    With the latent factors in the file they come back in place and training goes on;
    a codes-only checkpoint restores the trained (quantized) function and then refuses
    to train, instead of silently keeping the current weights.
    """
    from lava_peft.train.checkpoint import load_trainable, save_trainable

    torch.manual_seed(0)
    x = torch.randn(5, 8)
    config = LowBitConfig(r=2, bits=1, target_modules=["0"], keep_latent=keep_latent)
    model = lp.adapt(nn.Sequential(nn.Linear(8, 6)), config)
    _train(model, x, steps=3)
    save_trainable(model, tmp_path)
    with torch.no_grad():
        expected = model(x)
        latents = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    _train(model, x, steps=2, seed=5)  # move away from the checkpoint
    with torch.no_grad():
        assert not torch.equal(model(x), expected)
    params = [p for p in model.parameters() if p.requires_grad]
    pointers = [p.data_ptr() for p in params]
    load_trainable(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    if keep_latent:
        assert [p.data_ptr() for p in params] == pointers  # in place: an optimizer keeps its references
        for p, saved in zip(params, latents):
            assert torch.equal(p, saved)
    else:
        with pytest.raises(LavaError, match="keep_latent"):
            _train(model, x, steps=1)


def test_hot_swap_into_a_freshly_created_low_bit_adapter(tmp_path, one_thread):
    from lava_peft.hotswap import hotswap_adapter

    torch.manual_seed(0)
    pristine = nn.Sequential(nn.Linear(12, 10))
    x = torch.randn(4, 12)
    trained = lp.adapt(copy.deepcopy(pristine), LowBitConfig(r=2, target_modules=["0"]))
    _train(trained, x, seed=3)
    trained.save_pretrained(tmp_path)
    fresh = lp.adapt(copy.deepcopy(pristine), LowBitConfig(r=2, target_modules=["0"])).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), pristine(x))  # ΔW = 0 before the swap
    hotswap_adapter(fresh, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(fresh(x), trained.eval()(x))
