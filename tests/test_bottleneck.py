"""Bottleneck (module) adapters: the maths against independent computations on real architectures,
placement, 1-bit weights and files, Bi-Head, the reference codebook, parameter averaging, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import lava_peft as lp
from lava_peft.errors import LavaConfigError, LavaError, TargetModulesError, UnsupportedLayerError
from lava_peft.lowbit import gaussian_codebook, reference_codebook

from _tiny_models import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama


def _hooked(model, paths, fn):
    """Register ``out -> fn(path, inputs, out)`` hooks on ``paths`` of a plain model (the expectation)."""
    handles = []
    for path in paths:
        module = model.get_submodule(path)
        handles.append(module.register_forward_hook(lambda m, a, o, p=path: fn(p, a, o)))
    return handles


def _params(model, path):
    return {k: v.detach() for k, v in model.model.get_submodule(path).lava_module_adapters.adapters["default"]
            .named_parameters()}


def test_houlsby_on_bert_is_a_sequential_adapter_after_both_output_projections():
    model = lp.adapt(tiny_bert(), lp.HoulsbyConfig(r=3))
    paths = [p for p, _ in model.adapter_layers()]
    assert paths == [f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in ("attention.output.dense", "output.dense")]
    randomize_adapters(model)
    ids = torch.randint(0, 60, (2, 7))
    reference = tiny_bert()
    tensors = {p: _params(model, p) for p in paths}

    def houlsby(path, _, h):
        t = tensors[path]
        return h + F.linear(F.gelu(F.linear(h, t["down_weight"], t["down_bias"])), t["up_weight"], t["up_bias"])

    _hooked(reference, paths, houlsby)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_adaptformer_on_gpt2_and_llama_is_parallel_to_the_mlp_with_scale():
    for make, prefix in ((tiny_gpt2, "transformer.h"), (tiny_llama, "model.layers")):
        model = lp.adapt(make(), lp.AdaptFormerConfig(r=4, layer_norm=True))
        paths = [p for p, _ in model.adapter_layers()]
        assert paths == [f"{prefix}.{i}.mlp" for i in range(2)]
        randomize_adapters(model)
        tensors = {p: _params(model, p) for p in paths}
        reference = make()

        def adaptformer(path, args, out):
            t, x = tensors[path], args[0]
            z = F.layer_norm(x, (x.shape[-1],), t["ln_weight"], t["ln_bias"])
            return out + 0.1 * F.linear(F.relu(F.linear(z, t["down_weight"], t["down_bias"])), t["up_weight"],
                                        t["up_bias"])

        _hooked(reference, paths, adaptformer)
        ids = torch.randint(0, 60, (2, 6))
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-5)


def test_mobilenet_blocks_get_a_1x1_conv_bottleneck_on_their_output():
    from lava_peft.models.mobilenet_v2 import InvertedResidual, MobileNetV2

    torch.manual_seed(0)
    net = MobileNetV2(num_classes=4).eval()
    reference = copy.deepcopy(net)
    model = lp.adapt(net, lp.PfeifferConfig(r=2, target_modules=[InvertedResidual], activation="relu", scale=0.5))
    paths = [p for p, _ in model.adapter_layers()]
    assert len(paths) == sum(isinstance(m, InvertedResidual) for m in reference.modules()) == 17
    randomize_adapters(model)
    tensors = {p: _params(model, p) for p in paths}

    def conv_bottleneck(path, _, h):
        t = tensors[path]
        a = F.relu(F.conv2d(h, t["down_weight"][:, :, None, None], t["down_bias"]))
        return h + 0.5 * F.conv2d(a, t["up_weight"][:, :, None, None], t["up_bias"])

    _hooked(reference, paths, conv_bottleneck)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
    blocks = lp.adapt(copy.deepcopy(reference), lp.AdaptFormerConfig(target_modules="blocks", mode="sequential"))
    assert [p for p, _ in blocks.adapter_layers()] == paths  # the "blocks" placement finds the same modules


def test_weight_and_module_adapters_share_a_layer_and_names_stay():
    base = tiny_llama()
    names_before = {n for n, _ in base.named_parameters()}
    model = lp.adapt(base, lp.HoulsbyConfig(r=2, target_modules=["o_proj"]))
    model.add_adapter("lora", lp.LoraConfig(r=2, target_modules=["o_proj", "q_proj"]))  # wraps o_proj afterwards
    model.set_adapter(["default", "lora"])
    randomize_adapters(model)
    names_after = {n.replace(".base_layer", "") for n, _ in model.model.named_parameters()
                   if ".lava_module_adapters." not in n and ".adapters.lora." not in n}
    assert names_after == names_before
    ids = torch.randint(0, 60, (1, 5))
    with torch.no_grad():
        both = model(input_ids=ids).logits
        model.set_adapter("lora")
        only_lora = model(input_ids=ids).logits
        model.set_adapter("default")
        only_houlsby = model(input_ids=ids).logits
    assert not torch.allclose(both, only_lora) and not torch.allclose(both, only_houlsby)


def test_bi_adaptformer_stores_one_bit_per_weight_and_reloads_exactly(tmp_path):
    model = lp.adapt(tiny_bert(), lp.bi_adaptformer(r=8, binary_head="classifier", dropout=0.0))
    assert set(dict(model.adapter_layers())) == {"bert.encoder.layer.0", "bert.encoder.layer.1", "classifier"}
    randomize_adapters(model)
    model.eval()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    codes = {k: t for k, t in tensors.items() if k.endswith(".codes")}
    assert sorted(codes) == sorted([f"bert.encoder.layer.{i}.{w}_weight.codes" for i in range(2) for w in ("down", "up")]
                                   + ["classifier.head_weight.codes"])
    assert all(t.dtype == torch.uint8 for t in codes.values())
    assert codes["bert.encoder.layer.0.down_weight.codes"].numel() == math.ceil(8 * 16 / 8)  # r × in, 1 bit each
    assert codes["classifier.head_weight.codes"].numel() == math.ceil(3 * 16 / 8)
    assert not any(t.is_floating_point() and t.numel() > 2 for t in tensors.values())  # no fp32 weight stored
    ids = torch.randint(0, 60, (2, 6))
    loaded = lp.AdaptedModel.from_pretrained(tiny_bert(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    head = model.model.classifier.lava_module_adapters.adapters["default"]
    w = head.head_weight.detach()
    levels = torch.where(w >= w.mean(), w.mean() + 0.6744897501960817 * w.std(), w.mean() - 0.6744897501960817 * w.std())
    torch.testing.assert_close(head.effective("head_weight"), levels, rtol=1e-6, atol=1e-6)
    trainable = lp.AdaptedModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    trainable.train()
    with pytest.raises(LavaError, match="keep_latent"):  # codes alone cannot be trained further
        trainable(input_ids=ids)


def test_one_bit_training_uses_the_straight_through_gradient():
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Linear(6, 6)), lp.AdaptFormerConfig(r=4, bits=1, target_modules=["0"]))
    adapter = model.model[0].lava_module_adapters.adapters["default"]
    x = torch.randn(5, 6)
    model(x).pow(2).sum().backward()
    assert adapter.up_weight.grad is not None and torch.count_nonzero(adapter.up_weight.grad) > 0  # σ = 0: identity


# the reference's codebook (PETL-ViT binary_adapter utils.QLinear.quantize: 500 steps from zero), computed with
# numpy/scipy: [level 0, level 1, level 2^(k-1), Σ|levels|, threshold 0, Σ|thresholds|]
REFERENCE_CODEBOOK = {
    1: [-0.6744897501960817, 0.6744897501960817, 0.6744897501960817, 1.3489795003921634, 0.0, 0.0],
    2: [-1.2657203250220048, -0.3777541611494497, 0.3777541611494501, 3.286948972342909, -0.8217372430857273,
        1.6434744861714545],
    3: [-1.7920250350537401, -1.113728937876624, 0.20262380307074554, 7.467595004131084, -1.452876986465182,
        5.472946166006599],
    4: [-2.265490613378506, -1.7077375651639988, 0.10555028153922344, 16.160383041183902, -1.9866140883166687,
        13.789342135344025],
    5: [-2.6830764578417843, -2.20197089741469, 0.05292543311690487, 33.53466997165878, -2.442407642337321,
        30.79554532360479],
    6: [-2.8092450452503948, -2.3484059306452103, 0.011013055965165115, 49.89596459388375, -2.5782028848320944,
        47.03331467852804],
    7: [-2.809514775426147, -2.348724903131002, 2.2480434555710838e-05, 51.58484763745426, -2.5784923977250624,
        48.72173853006489],
    8: [-2.8095147754261514, -2.348724903131007, 0.0, 51.58599647019619, -2.578492397725067, 48.7228873627991],
}


@pytest.mark.parametrize("bits", range(1, 9))
def test_reference_codebook_equals_the_reference_numbers(bits):
    book = reference_codebook(bits)
    levels, thresholds = book.levels, book.thresholds
    got = [levels[0], levels[1], levels[len(levels) // 2], sum(map(abs, levels)), thresholds[0],
           sum(map(abs, thresholds))]
    assert got == pytest.approx(REFERENCE_CODEBOOK[bits], abs=1e-9)
    exact = gaussian_codebook(bits)
    gap = max(abs(a - b) for a, b in zip(levels, exact.levels))
    assert (gap < 1e-7) if bits <= 4 else (gap > 0.01)  # the fixed point has not converged from 5 bits on


def test_codebook_choice_changes_what_a_five_bit_adapter_computes():
    torch.manual_seed(0)
    w = torch.randn(40, 40)
    from lava_peft.lowbit import fake_quantize

    assert torch.equal(fake_quantize(w, 3, codebook="exact"), fake_quantize(w, 3, codebook="exact"))
    assert not torch.allclose(fake_quantize(w, 5, codebook="exact"), fake_quantize(w, 5, codebook="reference"))
    with pytest.raises(LavaConfigError, match="codebook"):
        lp.AdaptFormerConfig(bits=2, codebook="lloyd")


def test_parameter_averaging_of_module_adapters():
    model = lp.adapt(tiny_bert(), lp.AdaptFormerConfig(r=3))
    model.add_adapter("b", lp.AdaptFormerConfig(r=3))
    randomize_adapters(model)
    model.add_weighted_adapter(["default", "b"], [0.25, 0.75], "soup")
    for path, soup in model.adapter_layers("soup"):
        a, b = _params(model, path), dict(model.adapter_layers("b"))[path].state_dict()
        for key, value in soup.state_dict().items():
            torch.testing.assert_close(value, 0.25 * a[key] + 0.75 * b[key])
    with pytest.raises(LavaConfigError, match="ΔW"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "svd", combination_type="svd")
    model.add_adapter("lora", lp.LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(LavaConfigError, match="mix module adapters"):
        model.add_weighted_adapter(["default", "lora"], [0.5, 0.5], "mixed")
    model.add_adapter("wide", lp.AdaptFormerConfig(r=5))
    with pytest.raises(LavaConfigError, match="shapes"):
        model.add_weighted_adapter(["default", "wide"], [0.5, 0.5], "bad")
    assert set(model.peft_config) == {"default", "b", "soup", "lora", "wide"}


def test_merge_is_refused_with_the_reason_and_nothing_changes():
    model = lp.adapt(tiny_gpt2(), lp.AdaptFormerConfig(r=2))
    randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LavaError, match="nonlinear function, which no weight increment"):
        model.merge_adapter()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_placements_and_fields_are_refused_before_anything_changes():
    base = tiny_bert()
    with pytest.raises(UnsupportedLayerError, match="parallel adapter cannot read"):
        lp.adapt(base, lp.AdaptFormerConfig(target_modules=["word_embeddings"]))
    with pytest.raises(TargetModulesError, match="placement keyword"):
        lp.adapt(base, lp.AdaptFormerConfig(target_modules=["no_such_module"]))
    with pytest.raises(UnsupportedLayerError, match="no Linear"):
        lp.adapt(base, lp.HoulsbyConfig(target_modules=["LayerNorm"]))
    assert not any("lava_module_adapters" in n for n, _ in base.named_modules())
    for bad in (dict(mode="both"), dict(activation="swish"), dict(bits=9), dict(scale=float("nan")),
                dict(dropout_position="output"), dict(init="zeros"), dict(binary_head="")):
        with pytest.raises(LavaConfigError):
            lp.AdaptFormerConfig(**bad)
    from lava_peft.models.mobilenet_v2 import MobileNetV2

    net = lp.adapt(MobileNetV2(num_classes=3).eval(), lp.AdaptFormerConfig(target_modules="blocks"))  # parallel
    with pytest.raises(UnsupportedLayerError, match="mode='sequential'"):
        net(torch.randn(1, 3, 32, 32))


def test_modules_to_save_and_parameter_counts():
    model = lp.adapt(tiny_bert(), lp.PfeifferConfig(r=4, modules_to_save=["classifier"]))
    trainable, _ = model.get_nb_trainable_parameters()
    per_layer = 4 * 16 + 4 + 16 * 4 + 16  # Down (r × 16) + d + Up (16 × r) + b
    assert trainable == 2 * per_layer + 16 * 3 + 3


def test_scale_search_and_set_scale():
    from lava_peft.tools.bottleneck import search_scale, set_scale

    model = lp.adapt(tiny_gpt2(), lp.bi_adaptformer(r=4, dropout=0.0))
    randomize_adapters(model)
    ids = torch.randint(0, 60, (1, 5))
    base = tiny_gpt2()
    with torch.no_grad():
        one = model(input_ids=ids).logits - base(input_ids=ids).logits
        set_scale(model, 10.0)
        ten = model(input_ids=ids).logits - base(input_ids=ids).logits
    assert model.peft_config["default"].scale == 10.0
    assert not torch.allclose(one, ten)
    best, scores = search_scale(lambda s: -abs(math.log10(s) - 1.0))
    assert best == 10.0 and list(scores) == [0.01, 0.1, 1.0, 10.0, 100.0]
    with pytest.raises(LavaConfigError):
        set_scale(model, float("inf"))


def test_hotswap_fills_a_module_adapter_in_place(tmp_path):
    source = lp.adapt(tiny_gpt2(), lp.AdaptFormerConfig(r=3))
    randomize_adapters(source)
    source.save_pretrained(tmp_path)
    target = lp.adapt(tiny_gpt2(), lp.AdaptFormerConfig(r=3))
    pointers = [p.data_ptr() for p in target.parameters() if p.requires_grad]
    lp.hotswap_adapter(target, str(tmp_path))
    ids = torch.randint(0, 60, (2, 5))
    with torch.no_grad():
        assert torch.equal(target(input_ids=ids).logits, source(input_ids=ids).logits)
    assert pointers == [p.data_ptr() for p in target.parameters() if p.requires_grad]
