"""HF PEFT interop, checked against the real ``peft`` package."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lava_peft as lp
from _tiny_models import conv_net, randomize_adapters, tiny_bert, tiny_gpt2

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
IMG = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


EXPORT_CASES = {
    "bert_lava_patterns_head": (
        tiny_bert,
        lambda: lp.LavaConfig(r=2, alpha=3, target_modules=["query", "value", "word_embeddings", "dense"],
                              rank_pattern={"value": 3}, alpha_pattern={"attention.output.dense": 5.0},
                              modules_to_save=["classifier"]),
    ),
    "bert_lora_rslora": (
        tiny_bert,
        lambda: lp.LoraConfig(r=4, alpha=2, target_modules="all-linear", use_rslora=True),
    ),
    "gpt2_lora_conv1d_embedding": (
        tiny_gpt2,
        lambda: lp.LoraConfig(r=2, alpha=5, target_modules=["c_attn", "c_fc", "wte"], alpha_pattern={"c_fc": 2}),
    ),
    "gpt2_lava": (tiny_gpt2, lambda: lp.LavaConfig(r=3, alpha=4, target_modules=["c_attn", "c_proj", "wpe"])),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_then_peft_from_pretrained_gives_identical_outputs(case, tmp_path):
    make, cfg = EXPORT_CASES[case]
    model = lp.adapt(make(), cfg())
    randomize_adapters(model)
    model.eval()
    lp.export_peft(model, str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), _logits(model), rtol=1e-5, atol=1e-6)
    with theirs.disable_adapter():  # PEFT really loaded a non-trivial adapter
        assert not torch.allclose(_logits(theirs), _logits(model), atol=1e-3)
    # and back: import gives the same outputs again
    back = lp.import_peft(make(), str(tmp_path))
    torch.testing.assert_close(_logits(back), _logits(model), rtol=1e-5, atol=1e-6)


def test_exported_keys_and_config_follow_peft_naming(tmp_path):
    model = lp.adapt(tiny_bert(), lp.LavaConfig(r=2, target_modules=["query", "word_embeddings"],
                                                 rank_pattern={"layer.1.attention.self.query": 3}))
    lp.export_peft(model, str(tmp_path))
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.bert.embeddings.word_embeddings.lora_embedding_B" in keys
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2
    assert list(cfg["rank_pattern"].values()) == [3]
    lava_v = model.model.bert.encoder.layer[0].attention.self.query.adapters["default"].lava_V
    exported = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(exported["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"], lava_v.detach())


def test_conv_export_exact_for_lora_and_opt_in_for_cp_and_grouped(tmp_path):
    # plain LoRA conv: exported as is
    lora = lp.adapt(conv_net(), lp.LoraConfig(r=2, target_modules=["c1", "c2", "c3"]))
    randomize_adapters(lora)
    lp.export_peft(lora.eval(), str(tmp_path / "lora"))
    theirs = peft.PeftModel.from_pretrained(conv_net(), str(tmp_path / "lora")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IMG), lora(IMG), rtol=1e-5, atol=1e-5)
    # CP LAVA conv: refused without the flag, exact (same rank) with it
    lava = lp.adapt(conv_net(), lp.LavaConfig(r=3, target_modules=["c1", "c2", "c3", "head"]))
    randomize_adapters(lava)
    lava.eval()
    with pytest.raises(lp.LavaConfigError, match="allow_rank_expansion"):
        lp.export_peft(lava, str(tmp_path / "cp"))
    assert not (tmp_path / "cp").exists()
    lp.export_peft(lava, str(tmp_path / "cp"), allow_rank_expansion=True)
    theirs = peft.PeftModel.from_pretrained(conv_net(), str(tmp_path / "cp")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IMG), lava(IMG), rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "cp" / "adapter_config.json").read_text())["r"] == 3


def test_grouped_conv_export_needs_rank_times_groups(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1), nn.ReLU(), nn.Conv2d(6, 2, 1))
    model = lp.adapt(net, lp.LavaConfig(r=2, target_modules=["0"]))
    randomize_adapters(model)
    model.eval()
    x = torch.randn(2, 4, 5, 5)
    lp.export_peft(model, str(tmp_path), allow_rank_expansion=True)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4  # r * groups
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1), nn.ReLU(), nn.Conv2d(6, 2, 1))
    with pytest.warns(UserWarning, match="groups"):
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_refuses_what_peft_cannot_represent(tmp_path):
    torch.manual_seed(0)
    dilated = lp.adapt(nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2)), lp.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(lp.LavaConfigError, match="dilation"):
        lp.export_peft(dilated, str(tmp_path / "d"), allow_rank_expansion=True)
    model = lp.adapt(nn.Sequential(nn.Linear(4, 4)), lp.LoraConfig(r=2, target_modules=["0"]), "a")
    model.add_adapter("b", lp.LoraConfig(r=2, target_modules=["0"]))
    model.add_weighted_adapter(["a", "b"], [1, 1], "t", "ties_svd", density=0.5, result_method="dense_delta")
    with pytest.raises(lp.LavaConfigError, match="dense_delta"):
        lp.export_peft(model, str(tmp_path / "t"), adapter_name="t")
    assert not (tmp_path / "d").exists() and not (tmp_path / "t").exists()


IMPORT_CASES = {
    "bert": (tiny_bert, lambda: peft.LoraConfig(r=2, lora_alpha=3, target_modules=["query", "value", "word_embeddings"],
                                                  rank_pattern={"value": 4}, alpha_pattern={"query": 7},
                                                  modules_to_save=["classifier"], init_lora_weights=False)),
    "gpt2_rslora": (tiny_gpt2, lambda: peft.LoraConfig(r=3, lora_alpha=2, target_modules=["c_attn", "c_proj", "wte"],
                                                        use_rslora=True, fan_in_fan_out=True, init_lora_weights=False)),
    "conv": (conv_net, lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c1", "c2", "c3", "head"],
                                                init_lora_weights=False)),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_peft_directory_gives_identical_outputs(case, tmp_path):
    make, cfg = IMPORT_CASES[case]
    torch.manual_seed(1)
    theirs = peft.get_peft_model(make(), cfg())
    if case == "bert":
        with torch.no_grad():
            theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    theirs.eval()
    theirs.save_pretrained(str(tmp_path))
    ours = lp.import_peft(make(), str(tmp_path))
    assert ours.peft_config["default"].method == "lora"
    with torch.no_grad():
        if case == "conv":
            torch.testing.assert_close(ours(IMG), theirs(IMG), rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-6)
            with ours.disable_adapter():
                assert not torch.allclose(_logits(ours), _logits(theirs), atol=1e-3)
    # imported adapters are normal adapters: they merge (GPT-2 ties wte to lm_head: merging is refused)
    if case == "gpt2_rslora":
        with pytest.raises(lp.LavaError, match="tied"):
            ours.merge_adapter()
        assert ours.merged_adapters == []
        return
    with torch.no_grad():
        before = ours(IMG) if case == "conv" else _logits(ours)
        ours.merge_adapter()
        after = ours(IMG) if case == "conv" else _logits(ours)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_import_refuses_unsupported_peft_features_and_wrong_base(tmp_path):
    # DoRA imports now (tests/test_dora.py); a LoRA bias still changes the forward in a way we do not hold
    biased = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"], lora_bias=True))
    biased.save_pretrained(str(tmp_path / "bias"))
    with pytest.raises(lp.AdapterFileError, match="lora_bias"):
        lp.import_peft(tiny_bert(), str(tmp_path / "bias"))
    plain = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    plain.save_pretrained(str(tmp_path / "gpt2"))
    base = tiny_bert()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(lp.IncompatibleBaseModelError, match="no such module"):
        lp.import_peft(base, str(tmp_path / "gpt2"))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert not any(isinstance(m, lp.AdaptedLayer) for m in base.modules())
