"""The shared contract matrix: every (method, layer type, config) row passes the same tests.

A new weight-delta method joins by adding rows to ``ROWS``; merge, disable, save/load,
trainability and gradient flow are then checked for it on every layer type.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lava_peft as lp
from lava_peft import ShiraConfig


class GPT2Conv1D(nn.Module):
    """Independent copy of transformers' GPT-2 ``Conv1D`` (weight stored as (in, out))."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


GPT2Conv1D.__name__ = "Conv1D"

# name -> (layer factory, input factory)
LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), lambda: torch.randn(4, 12)),
    "conv1d_stride": (lambda: nn.Conv1d(6, 8, 3, stride=2, padding=1), lambda: torch.randn(2, 6, 11)),
    "conv2d_same_reflect_dilated": (
        lambda: nn.Conv2d(6, 8, 3, padding="same", padding_mode="reflect", dilation=2),
        lambda: torch.randn(2, 6, 9, 9),
    ),
    "conv2d_grouped": (lambda: nn.Conv2d(8, 12, 3, groups=4, stride=2), lambda: torch.randn(2, 8, 9, 9)),
    "conv2d_depthwise": (lambda: nn.Conv2d(8, 8, 3, groups=8, padding=1, bias=False), lambda: torch.randn(2, 8, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(4, 6, (3, 2, 2), padding=1), lambda: torch.randn(2, 4, 5, 5, 5)),
    "gpt2_conv1d": (lambda: GPT2Conv1D(10, 12), lambda: torch.randn(3, 5, 12)),
    "embedding": (lambda: nn.Embedding(20, 10, padding_idx=0), lambda: torch.randint(0, 20, (3, 5))),
}

CONFIGS = {
    "lora": lambda: lp.LoraConfig(r=2, alpha=4, target_modules=["0"]),
    "lava": lambda: lp.LavaConfig(r=2, alpha=4, target_modules=["0"]),
    "lava_loranit_all": lambda: lp.LavaConfig(r=2, alpha=3, target_modules=["0"], init="lora", orth_factors="all"),
    "lava_rslora_uniform": lambda: lp.LavaConfig(
        r=3, alpha=2, target_modules=["0"], use_rslora=True, spatial_init="uniform", rank_pattern={"0": 1}
    ),
    "dylora_lora": lambda: lp.DyLoraConfig(r=3, alpha=4, target_modules=["0"]),
    "dylora_lora_frozen_global": lambda: lp.DyLoraConfig(
        r=3, r_min=2, alpha=2, target_modules=["0"], update="frozen", rank_sampling="global", init="gaussian"
    ),
    "dylora_lava": lambda: lp.DyLoraConfig(r=3, alpha=4, target_modules=["0"], factorization="lava"),
    "dylora_lava_frozen_all": lambda: lp.DyLoraConfig(
        r=3, alpha=3, target_modules=["0"], factorization="lava", update="frozen", init="lora", orth_factors="all",
        use_rslora=True, eval_rank=2
    ),
    "lowbit_lora_1bit": lambda: lp.LowBitConfig(r=2, alpha=4, target_modules=["0"]),
    "lowbit_lava_2bit": lambda: lp.LowBitConfig(r=2, alpha=4, bits=2, factorization="lava", target_modules=["0"]),
    "lowbit_lava_1bit_rslora_uniform": lambda: lp.LowBitConfig(
        r=3, alpha=2, factorization="lava", use_rslora=True, spatial_init="uniform", rank_pattern={"0": 1},
        target_modules=["0"]
    ),
    "lowbit_lava_loranit_3bit_up_latent": lambda: lp.LowBitConfig(
        r=2, alpha=3, bits=3, factorization="lava", factor_init="lora", quantize="up", keep_latent=True,
        orth_lambda=0.1, orth_factors="all", target_modules=["0"]
    ),
    # MoSA: modules drawn per training step; the zero-initialised LoRA up factor split "up" would leave
    # some tensors without gradient in the few steps of the contract, so LAVA (U non-zero) and "all" rows
    "mosa_lava": lambda: lp.MosaConfig(r=2, alpha=4, target_modules=["0"], factorization="lava"),
    "mosa_lora_all": lambda: lp.MosaConfig(r=2, alpha=4, target_modules=["0"], split="all", n_modules=2),
    "mosa_lava_all_global": lambda: lp.MosaConfig(
        r=2, alpha=4, target_modules=["0"], factorization="lava", split="all", n_modules=2, module_sampling="global",
        orth_lambda=0.1, rescale=False
    ),
    "sft_random_l1": lambda: lp.SftConfig(density=0.3, mask_type="random", l1_lambda=0.1, target_modules=["0"]),
    "sft_struct_r_alpha": lambda: lp.SftConfig(r=1, density=None, alpha=0.5, mask_type="struct", seed=3,
                                               target_modules=["0"]),
    "shira_random": lambda: ShiraConfig(r=2, target_modules=["0"]),
    "shira_struct_density": lambda: ShiraConfig(density=0.3, alpha=0.5, mask_type="struct", target_modules=["0"]),
    # the representation of combination results (ties/dare/...): a full ΔW, trainable like any adapter
    "dense_delta": lambda: lp.DenseDeltaConfig(target_modules=["0"]),
    "dense_delta_scaled": lambda: lp.DenseDeltaConfig(r=2, alpha=3, target_modules=["0"]),
}

ROWS = [(m, layer) for m in CONFIGS for layer in LAYERS]


def _build(method: str, layer: str, seed: int = 0):
    torch.manual_seed(seed)
    make_layer, make_input = LAYERS[layer]
    base = nn.Sequential(make_layer())
    pristine = copy.deepcopy(base)
    x = make_input()
    model = lp.adapt(base, CONFIGS[method]())
    return model, pristine, x


def _train_steps(model, x, steps: int = 3, lr: float = 0.05):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    torch.manual_seed(123)
    target = torch.randn_like(model(x).float())
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - target).pow(2).mean() + model.regularization_loss()
        loss.backward()
        opt.step()
    return params


def _adapter_params(model):
    return {n: p for n, p in model.named_parameters() if ".adapters." in n}


@pytest.mark.parametrize("method,layer", ROWS)
def test_forward_shape_dtype_and_zero_delta_at_init(method, layer):
    model, pristine, x = _build(method, layer)
    out, ref = model(x), pristine(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    for _, adapter in model.adapter_layers():
        assert torch.count_nonzero(adapter.delta_weight()) == 0
    assert torch.equal(out, ref)


@pytest.mark.parametrize("method,layer", ROWS)
def test_merged_equals_unmerged_and_unmerge_restores(method, layer):
    model, pristine, x = _build(method, layer)
    _train_steps(model, x)
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        assert not torch.allclose(unmerged, pristine(x)), "training should have changed the output"
        model.merge_adapter()
        assert model.merged_adapters == ["default"]
        merged = model(x)
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        assert model.merged_adapters == []
    base_now = model.model[0].base_layer.weight
    torch.testing.assert_close(base_now, pristine[0].weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,layer", ROWS)
def test_disable_adapter_gives_base_output(method, layer):
    model, pristine, x = _build(method, layer)
    _train_steps(model, x)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(x), pristine(x))
    model.merge_adapter()
    with torch.no_grad(), model.disable_adapter():  # merged: unmerged inside the block
        torch.testing.assert_close(model(x), pristine(x), rtol=0, atol=1e-5)
    assert model.merged_adapters == ["default"]


@pytest.mark.parametrize("method,layer", ROWS)
def test_save_then_from_pretrained_gives_identical_outputs(method, layer, tmp_path):
    model, pristine, x = _build(method, layer)
    fresh_base = copy.deepcopy(pristine)
    _train_steps(model, x)
    model.eval()
    model.save_pretrained(tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))  # .lava-gen-*: see io.atomic_directory
    assert written == ["adapter_config.json", "adapter_model.safetensors", "lava_manifest.json"]
    loaded = lp.AdaptedModel.from_pretrained(fresh_base, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.get_nb_trainable_parameters()[0] == 0  # is_trainable=False
    trainable = lp.AdaptedModel.from_pretrained(copy.deepcopy(pristine), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == sum(p.numel() for p in _adapter_params(model).values())


@pytest.mark.parametrize("method,layer", ROWS)
def test_only_adapter_tensors_trainable_and_all_get_gradients(method, layer):
    model, _, x = _build(method, layer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(_adapter_params(model)) and trainable
    _train_steps(model, x, steps=2)  # after a step every factor is non-zero
    model.zero_grad()
    (model(x).float().pow(2).mean() + model.regularization_loss()).backward()
    for name, p in _adapter_params(model).items():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    base_params = [p for n, p in model.named_parameters() if ".adapters." not in n]
    assert all(p.grad is None for p in base_params)


@pytest.mark.parametrize("layer", ["linear", "conv2d_grouped", "embedding", "gpt2_conv1d"])
def test_bf16_base_keeps_fp32_adapters_and_bf16_activations(layer):
    model, pristine, x = _build("lava", layer)
    model.to(torch.bfloat16)
    x = x if layer == "embedding" else x.to(torch.bfloat16)
    _train_steps(model, x, steps=1)
    assert all(p.dtype == torch.float32 for p in _adapter_params(model).values())
    assert model(x).dtype == torch.bfloat16


def test_multiple_adapters_add_set_delete():
    model, pristine, x = _build("lava", "conv2d_grouped")
    model.add_adapter("other", lp.LoraConfig(r=2, target_modules=["0"]))
    assert model.active_adapters == ["default"]
    _train_steps(model, x)
    out_default = model(x).detach()
    model.set_adapter("other")
    assert model.active_adapters == ["other"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.other." in n for n in trainable)
    assert torch.equal(model(x), pristine(x))  # LoRA B = 0 at init
    model.set_adapter(["default", "other"])
    _train_steps(model, x)
    both = model(x).detach()
    layer = model.model[0]
    expected = pristine[0]._conv_forward(
        x, pristine[0].weight + layer.adapters["default"].delta_weight() + layer.adapters["other"].delta_weight(), pristine[0].bias
    )
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-6)
    model.delete_adapter("default")
    assert model.active_adapters == ["other"] and list(model.peft_config) == ["other"]
    assert out_default.shape == both.shape


def test_set_adapter_on_merged_model_switches_in_place():
    model, pristine, x = _build("lava", "linear")
    _train_steps(model, x)
    model.add_adapter("b", lp.LavaConfig(r=2, target_modules=["0"]))
    model.set_adapter("b")
    _train_steps(model, x)
    model.set_adapter("default")
    ref_default = model(x).detach()
    model.merge_adapter()
    ptr = model.model[0].base_layer.weight.data_ptr()
    model.set_adapter("b")
    assert model.merged_adapters == ["b"]
    assert model.model[0].base_layer.weight.data_ptr() == ptr
    model.set_adapter("default")
    torch.testing.assert_close(model(x), ref_default, rtol=1e-5, atol=1e-6)


def test_merge_and_unload_and_unload_return_plain_modules():
    model, pristine, x = _build("lava", "conv3d")
    _train_steps(model, x)
    expected = model(x).detach()
    merged = model.merge_and_unload()
    assert isinstance(merged[0], nn.Conv3d)
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)

    model, pristine, x = _build("lora", "linear")
    _train_steps(model, x)
    plain = model.unload()
    assert isinstance(plain[0], nn.Linear)
    torch.testing.assert_close(plain(x), pristine(x), rtol=0, atol=1e-6)


def test_print_and_count_trainable_parameters(capsys):
    model, _, _ = _build("lava", "conv2d_grouped")
    trainable, total = model.get_nb_trainable_parameters()
    # r=2 CP on a (12, 2, 3, 3) kernel: 2 * (12 + 2 + 3 + 3)
    assert trainable == 40
    assert total == 40 + 12 * 2 * 9 + 12
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        f"trainable params: 40 || all params: {total:,d} || trainable%: {100 * 40 / total:.4f}"
    )


def test_modules_to_save_head_is_trained_and_saved(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    fresh = copy.deepcopy(base)
    model = lp.adapt(base, lp.LavaConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    x = torch.randn(5, 6)
    params = _train_steps(model, x)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.2.copies.default.weight" in names
    assert not torch.equal(model.model[2].copies["default"].weight, fresh[2].weight)
    model.save_pretrained(tmp_path)
    loaded = lp.AdaptedModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(loaded(x), model(x))
    assert len(params) == 2 + 2
