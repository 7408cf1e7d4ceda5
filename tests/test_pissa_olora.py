"""PiSSA and OLoRA initialisation (``init_lora_weights="pissa" | "pissa_niter_<K>" | "olora"``), against the real
``peft`` 0.21.2 on the same tiny models with the same seed.

* the factors and the residual base weights are PEFT's, bit for bit (same machine, same generator state; the
  randomized ``pissa_niter_<K>`` included), on Llama (``nn.Linear``) and GPT-2 (``Conv1D``, PEFT's
  ``fan_in_fan_out``), and LAVA on Linear layers gets the same ``U = B₀``, ``V = A₀``;
* at step 0 the outputs are the base model's; after "training" (perturbed factors) a saved folder loads in
  PEFT and here onto the ORIGINAL base with the trained outputs, and onto a residual base it is refused;
* conversion to a plain rank-2r LoRA (``convert_pissa_to_lora=True`` and PEFT's
  ``path_initial_model_for_weight_conversion``) gives PEFT's converted tensors, and on the original base the
  trained model's outputs, in PEFT and here;
* ``import_peft`` of PEFT's PiSSA / OLoRA folders (unconverted: re-derived on the original base; converted:
  a plain LoRA); the refusals (randomized SVD reload, EVA/LoftQ/CorDA, conv layers, DoRA, hot-swap).
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
import transformers

import lava_peft as lp
from _tiny_models import tiny_gpt2, tiny_llama

IDS = torch.tensor([[2, 5, 7, 9, 11, 3], [4, 8, 15, 16, 23, 42]])
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unexpected keyword arguments")  # PEFT meeting our extra fields
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        yield


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def both(arch: str, init: str, seed: int = 3, **kw):
    """``(base, peft model, our model)`` built from copies of one base with the same seed."""
    base = BUILD[arch]()
    fields = dict(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=init, **kw)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(fan_in_fan_out=arch == "gpt2", **fields))
    torch.manual_seed(seed)
    ours = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(**fields))
    return base, theirs, ours


def peft_layer(model, path):
    return model.get_submodule(f"base_model.model.{path}")


def train_both(theirs, ours, seed: int = 7):
    """The same perturbation of every factor in both models ("training")."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, adapter in ours.adapter_layers("default"):
            layer = peft_layer(theirs, path)
            for mine, peft_param in ((adapter.lora_A, layer.lora_A["default"].weight),
                                     (adapter.lora_B, layer.lora_B["default"].weight)):
                step = 0.05 * torch.randn(mine.shape, generator=gen)
                mine.add_(step)
                peft_param.add_(step)


# =============================================================================== same init as PEFT
@pytest.mark.parametrize("arch, init", [("llama", "pissa"), ("llama", "pissa_niter_2"), ("llama", "olora"),
                                        ("gpt2", "pissa"), ("gpt2", "pissa_niter_2")])
def test_factors_and_residual_base_are_peft_s(arch, init):
    """(OLoRA on GPT-2's Conv1D is not compared: peft 0.21.2 takes the QR of the stored (in, out) weight without
    transposing it, so lora_B gets shape (in, r) and its forward fails on non-square layers; ours factorises the
    (out, in) matrix as on nn.Linear, checked by ``test_olora_on_gpt2_conv1d_factorises_the_out_in_matrix``.)"""
    base, theirs, ours = both(arch, init)
    assert ours.peft_config["default"].init == init
    layers = ours.adapter_layers("default")
    assert len(layers) == 6  # 2 layers × (q, v, down) or (c_attn, attn.c_proj, mlp.c_proj)
    for path, adapter in layers:
        layer = peft_layer(theirs, path)
        assert torch.equal(adapter.lora_A, layer.lora_A["default"].weight), path
        assert torch.equal(adapter.lora_B, layer.lora_B["default"].weight), path
        assert torch.equal(ours.model.get_submodule(path).base_layer.weight, layer.base_layer.weight), path
        original = base.get_submodule(path).weight
        assert not torch.equal(layer.base_layer.weight, original)  # the base really is the residual
        canonical = original.T if arch == "gpt2" else original
        w0 = adapter.scale * adapter.lora_B @ adapter.lora_A  # W = W_res + s·B₀A₀ (to rounding)
        residual = ours.model.get_submodule(path).base_layer.weight
        torch.testing.assert_close((residual.T if arch == "gpt2" else residual) + w0, canonical, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(ours), logits(base), atol=1e-5, rtol=0)  # unchanged at step 0


def test_pissa_factors_are_the_scaled_singular_triplets_and_olora_the_qr():
    """Independent of PEFT: s·B₀A₀ is the rank-r truncated SVD (PiSSA) / s·Q_r R_r (OLoRA) of the weight."""
    base = tiny_llama()
    w = base.get_submodule("model.layers.0.mlp.down_proj").weight.detach().double()
    for init in ("pissa", "olora"):
        model = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(r=3, alpha=12, target_modules=["down_proj"],
                                                                     init=init))
        adapter = dict(model.adapter_layers("default"))["model.layers.0.mlp.down_proj"]
        b, a = adapter.lora_B.double(), adapter.lora_A.double()
        if init == "pissa":
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            expected = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
            torch.testing.assert_close(adapter.scale * b @ a, expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(b.T @ b, torch.diag(s[:3] / adapter.scale), atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(b.T @ b, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)  # Q_r
            assert torch.all(a.tril(-1)[:, :3] == 0)  # R_r: upper triangular
            torch.testing.assert_close(b @ a, torch.linalg.qr(w)[0][:, :3] @ torch.linalg.qr(w)[1][:3], atol=1e-6,
                                       rtol=0)


def test_olora_on_gpt2_conv1d_factorises_the_out_in_matrix():
    base = tiny_gpt2()
    model = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(r=4, alpha=8, target_modules=["c_attn"],
                                                                 init="olora"))
    for path, adapter in model.adapter_layers("default"):
        w = base.get_submodule(path).weight.detach().T  # (out, in)
        q, r = torch.linalg.qr(w)
        assert torch.equal(adapter.lora_B, q[:, :4].contiguous()) and torch.equal(adapter.lora_A, r[:4].contiguous())
        expected = (w - adapter.scale * adapter.lora_B @ adapter.lora_A).T
        assert torch.equal(model.model.get_submodule(path).base_layer.weight, expected)
    torch.testing.assert_close(logits(model), logits(base), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["olora", "pissa_niter_2"])
def test_lava_linear_gets_the_same_factors(init):
    base = tiny_llama()
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                       init_lora_weights=init))
    torch.manual_seed(0)
    lava = lp.get_peft_model(copy.deepcopy(base), lp.LavaConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                init_lora_weights=init, orth_lambda=0.1))
    for path, adapter in lava.adapter_layers("default"):
        layer = peft_layer(theirs, path)
        assert torch.equal(adapter.lava_U, layer.lora_B["default"].weight)
        assert torch.equal(adapter.lava_V, layer.lora_A["default"].weight)
        assert torch.equal(lava.model.get_submodule(path).base_layer.weight, layer.base_layer.weight)
    if init == "olora":  # OLoRA's B₀ = Q_r is orthonormal: LAVA's penalty is 0
        assert float(lava.regularization_loss().detach()) < 1e-10
    torch.testing.assert_close(logits(lava), logits(theirs), atol=1e-6, rtol=0)


# =============================================================================== save / load
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_folder_loads_onto_the_original_base_here_and_in_peft(tmp_path, init):
    base, theirs, ours = both("llama", init)
    train_both(theirs, ours)
    trained = logits(ours)
    torch.testing.assert_close(trained, logits(theirs), atol=1e-6, rtol=0)
    assert (trained - logits(base)).abs().max() > 1e-3
    ours.save_pretrained(tmp_path / "ours")
    payload = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert payload["init_lora_weights"] == init and payload["config"]["init"] == init
    assert "ORIGINAL base" in payload["base_weights"]
    original_digest = lp.AdaptedModel(copy.deepcopy(base), lp.LoraConfig(target_modules=["q_proj"])).base_fingerprint()
    q0 = "model.layers.0.self_attn.q_proj"
    assert payload["base_model_fingerprint"]["weights"][q0] == original_digest["weights"][q0]  # W, not W_res

    reloaded = lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(reloaded), trained, atol=1e-6, rtol=0)
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(in_peft), trained, atol=1e-6, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    imported = lp.import_peft(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(logits(imported), trained, atol=1e-6, rtol=0)

    residual = copy.deepcopy(base)  # the residual base: loading onto it would subtract s·B₀A₀ twice
    with torch.no_grad():
        for path, _ in ours.adapter_layers("default"):
            residual.get_submodule(path).weight.copy_(ours.model.get_submodule(path).base_layer.weight)
    with pytest.raises(lp.IncompatibleBaseModelError, match="ORIGINAL base"):
        lp.PeftModel.from_pretrained(residual, tmp_path / "ours")
    with pytest.raises(lp.IncompatibleBaseModelError, match="ORIGINAL base"):
        ours.load_adapter(tmp_path / "ours", "again")
    assert list(ours.peft_config) == ["default"]


@pytest.mark.parametrize("how", ["ours", "peft_keyword"])
def test_conversion_to_lora_on_the_original_base(tmp_path, how):
    base, theirs, ours = both("llama", "pissa")
    ours.save_pretrained(tmp_path / "init")  # right after initialisation (PEFT's workflow)
    theirs.save_pretrained(tmp_path / "peft_init")
    train_both(theirs, ours)
    trained = logits(ours)
    if how == "ours":
        ours.save_pretrained(tmp_path / "lora", convert_pissa_to_lora=True)
    else:
        ours.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    theirs.save_pretrained(tmp_path / "peft_lora", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))

    mine = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    reference = json.loads((tmp_path / "peft_lora" / "adapter_config.json").read_text())
    assert (mine["r"], mine["lora_alpha"], mine["init_lora_weights"]) == (8, 16, True)
    assert (reference["r"], reference["lora_alpha"]) == (8, 16) and "base_weights" not in mine
    from safetensors.torch import load_file
    got, expected = load_file(tmp_path / "lora" / "adapter_model.safetensors"), \
        load_file(tmp_path / "peft_lora" / "adapter_model.safetensors")
    assert set(got) == set(expected)
    for key in got:
        assert torch.equal(got[key], expected[key]), key

    for loaded in (lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora"),
                   peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora")):
        torch.testing.assert_close(logits(loaded), trained, atol=1e-5, rtol=0)
        assert torch.equal(loaded.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight,
                           base.model.layers[0].self_attn.q_proj.weight)  # a plain LoRA: the base is left alone
    converted = lp.import_peft(copy.deepcopy(base), tmp_path / "peft_lora")
    torch.testing.assert_close(logits(converted), trained, atol=1e-5, rtol=0)


def test_conversion_with_rslora_and_patterns_keeps_every_scale(tmp_path):
    base = tiny_llama()
    cfg = lp.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="olora",
                        use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\..*": 3.0})
    model = lp.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for _, adapter in model.adapter_layers("default"):
            adapter.lora_A.mul_(1.1)
    trained = logits(model)
    model.save_pretrained(tmp_path / "lora", convert_pissa_to_lora=True)
    for loaded in (lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora"),
                   peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora")):
        torch.testing.assert_close(logits(loaded), trained, atol=1e-5, rtol=0)


# =============================================================================== refusals
def test_randomized_pissa_reload_is_refused_and_conversion_is_offered(tmp_path):
    base, theirs, ours = both("llama", "pissa_niter_2")
    with pytest.warns(UserWarning, match="convert_pissa_to_lora=True"):
        ours.save_pretrained(tmp_path / "ours")
    with pytest.raises(lp.AdapterFileError, match="randomized SVD cannot be recomputed"):
        lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    with pytest.raises(lp.AdapterFileError, match="path_initial_model_for_weight_conversion"):
        lp.import_peft(copy.deepcopy(base), tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "lora", convert_pissa_to_lora=True)
    loaded = lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora")
    torch.testing.assert_close(logits(loaded), logits(ours), atol=1e-5, rtol=0)


def test_clear_refusals(tmp_path):
    for init, why in [("eva", "data loader"), ("loftq", "bitsandbytes"), ("corda", "preprocess_corda"),
                      ("orthogonal", "non-zero increment")]:
        with pytest.raises(lp.LavaConfigError, match=why):
            lp.LoraConfig(init_lora_weights=init)
    with pytest.raises(lp.LavaConfigError, match="pissa_niter_<K>"):
        lp.LoraConfig(init="pissa_niter_x")
    with pytest.raises(lp.LavaConfigError, match="use_dora=True"):
        lp.LoraConfig(init_lora_weights="pissa", use_dora=True)
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(lp.LavaConfigError, match="Linear layers"):  # PEFT has no PiSSA on embeddings/convs either
        lp.get_peft_model(base, lp.LoraConfig(target_modules=["q_proj", "embed_tokens"], init_lora_weights="pissa"))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # nothing changed
    model = lp.get_peft_model(base, lp.LoraConfig(target_modules=["q_proj"], init_lora_weights="olora"))
    with pytest.warns(UserWarning, match="residual base"):
        model.add_adapter("other", lp.LoraConfig(target_modules=["v_proj"]))
    model.save_pretrained(tmp_path / "olora", adapter_name="default")
    with pytest.raises(lp.AdapterFileError, match="hot-swap"):
        lp.hotswap_adapter(model, str(tmp_path / "olora"), "other")


def test_combination_result_is_not_initialised_from_the_base():
    base = tiny_llama()
    model = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(target_modules=["q_proj"], init="pissa"))
    residual = model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    model.add_weighted_adapter(["default"], [0.5], "halved", combination_type="exact_linear")
    assert model.peft_config["halved"].init == "default"
    assert torch.equal(model.model.model.layers[0].self_attn.q_proj.base_layer.weight, residual)


def test_bf16_base_gets_peft_s_bf16_residual_and_the_initial_factors_stay_fp32(tmp_path):
    base = tiny_llama().to(torch.bfloat16)
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields), autocast_adapter_dtype=True)
    ours = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(**fields))
    for path, adapter in ours.adapter_layers("default"):
        residual = ours.model.get_submodule(path).base_layer.weight
        assert residual.dtype == torch.bfloat16
        assert torch.equal(residual, peft_layer(theirs, path).base_layer.weight)
        # PEFT stores the factors in the base's dtype (bf16-rounded, then upcast); ours stay fp32 (the invariant)
        rounded = adapter.lora_A.detach().to(torch.bfloat16).float()
        assert torch.equal(rounded, peft_layer(theirs, path).lora_A["default"].weight.float())
    before = {path: adapter.initial_up.clone() for path, adapter in ours.adapter_layers("default")}
    ours.half()
    for path, adapter in ours.adapter_layers("default"):
        assert adapter.initial_up.dtype == adapter.initial_down.dtype == torch.float32
        assert torch.equal(adapter.initial_up, before[path])  # not rounded through fp16


def test_merge_keeps_the_trained_weights_and_unmerged_removal_warns():
    base, theirs, ours = both("llama", "olora")
    train_both(theirs, ours)
    trained = logits(ours)
    merged = copy.deepcopy(ours).merge_and_unload()
    torch.testing.assert_close(logits(merged), trained, atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="leave the residual"):
        copy.deepcopy(ours).unload()
    with pytest.warns(UserWarning, match="leave the residual"):
        ours.delete_adapter("default")


def test_export_peft_of_a_pissa_adapter_is_read_by_peft_on_the_original_base(tmp_path):
    base, theirs, ours = both("gpt2", "pissa")
    train_both(theirs, ours)
    lp.export_peft(ours, str(tmp_path / "exported"))
    assert json.loads((tmp_path / "exported" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "exported")
    torch.testing.assert_close(logits(in_peft), logits(ours), atol=1e-6, rtol=0)


def test_loading_onto_the_original_base_in_another_dtype_warns(tmp_path):
    base, theirs, ours = both("llama", "pissa")
    train_both(theirs, ours)
    ours.save_pretrained(tmp_path / "ours")
    with pytest.warns(UserWarning, match="another dtype"):
        loaded = lp.PeftModel.from_pretrained(copy.deepcopy(base).to(torch.bfloat16), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded).float(), logits(ours), atol=0.05, rtol=0.05)  # bf16 rounding only
