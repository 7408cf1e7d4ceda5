"""A drop-in for HF PEFT users (issue 12, part A), checked against the real ``peft`` on tiny random models.

* PEFT's documented snippets (quicktour, LoRA guide, loading several adapters, mixed batches,
  checkpoint format) run with only the import changed (``lib`` is ``peft`` or ``lava_peft``) and give the
  same numbers as with ``peft``;
* pattern semantics (``target_modules`` regex/list, ``rank_pattern``/``alpha_pattern`` keys,
  ``layers_to_transform``/``layers_pattern``, default targets): the same modules, ranks and scales;
* ``save_pretrained`` writes folders ``peft.PeftModel.from_pretrained`` and transformers'
  ``load_adapter`` read as they are; today's reader still loads format-1 folders (fixture);
* ``transformers.Trainer`` with default ``TrainingArguments`` (column pruning on) trains and saves adapters only.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import lava_peft as lp
from _tiny_models import conv_net, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama

FIXTURES = Path(__file__).parent / "fixtures" / "format_v1"
IDS = torch.tensor([[2, 5, 7, 9, 11, 3], [4, 8, 15, 16, 23, 42]])

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unexpected keyword arguments")  # PEFT meeting our extra fields
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def saved_base(tmp_path, build, name="base"):
    """A tiny model saved as a transformers folder, loaded back (so it has a name_or_path)."""
    folder = tmp_path / name
    build().save_pretrained(folder)
    return folder


# =============================================================================== config names
def test_peft_config_names_are_aliases_and_refusals_are_clear():
    cfg = lp.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, bias="none", task_type=lp.TaskType.SEQ_CLS,
                        inference_mode=False, target_modules={"value", "query"}, init_lora_weights="gaussian",
                        fan_in_fan_out=False)
    assert (cfg.alpha, cfg.lora_alpha, cfg.dropout, cfg.init, cfg.task_type) == (16, 16, 0.1, "gaussian", "SEQ_CLS")
    assert cfg.target_modules == ["query", "value"] and "lora_alpha" not in cfg.to_dict()  # ours stay canonical
    for bad, message in [(dict(bias="all"), "bias='all' is not supported"),
                         (dict(init_lora_weights=False), "init_lora_weights=False"),
                         (dict(init_lora_weights="loftq"), "bitsandbytes"),
                         (dict(alpha=2, lora_alpha=2), "not both"),
                         (dict(target_modules="q", layers_to_transform=[0]), "need target_modules as a list"),
                         (dict(layers_pattern="layers"), "layers_pattern needs layers_to_transform"),
                         (dict(task_type="CLASSIFY"), "task_type must be one of")]:
        with pytest.raises(lp.LavaConfigError, match=message):
            lp.LoraConfig(**bad)


# =============================================================================== quicktour
def quicktour(lib, base_dir, out_dir):
    """PEFT's quicktour (causal LM variant), lines as in the docs; ``lib`` is ``peft`` or ``lava_peft``."""
    from transformers import AutoModelForCausalLM

    peft_config = lib.LoraConfig(task_type=lib.TaskType.CAUSAL_LM, inference_mode=False, r=8, lora_alpha=32,
                                 lora_dropout=0.1)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model = lib.get_peft_model(model, peft_config)
    model.print_trainable_parameters()
    model.save_pretrained(out_dir)
    return model


def test_quicktour_same_counts_and_files_peft_and_transformers_read(tmp_path, capsys):
    base_dir = saved_base(tmp_path, tiny_llama)
    quicktour(peft, base_dir, tmp_path / "theirs")
    theirs_counts = capsys.readouterr().out.strip().splitlines()[-1]
    ours = quicktour(lp, base_dir, tmp_path / "ours")
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == theirs_counts  # the same trainable/all parameter counts
    assert "adapting ['q_proj', 'v_proj']" in printed  # the default targets are said
    randomize_adapters(ours, seed=1)
    ours.eval()
    ours.save_pretrained(tmp_path / "ours")
    expected = logits(ours)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir) and config["config"]["task_type"] == "CAUSAL_LM"
    # PEFT and transformers read our folder as it is; AutoPeftModel* finds the base model from the config
    torch.testing.assert_close(logits(peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "ours")), expected)
    torch.testing.assert_close(logits(lp.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "ours")), expected)
    torch.testing.assert_close(logits(lp.AutoPeftModel.from_pretrained(tmp_path / "ours")), expected)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    base.load_adapter(str(tmp_path / "ours"))
    torch.testing.assert_close(logits(base), expected)
    # ... and we read PEFT's folder: configs and weights
    assert lp.LoraConfig.from_pretrained(tmp_path / "theirs").r == 8
    assert lp.PeftConfig.from_pretrained(tmp_path / "ours") == ours.peft_config["default"]
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "theirs")
    torch.testing.assert_close(logits(lp.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "theirs")),
                               logits(theirs))


# =============================================================================== LoRA guide: classification
def lora_guide(lib, model):
    """PEFT's LoRA guide / sequence-classification example: task_type, bias, modules_to_save, merge."""
    config = lib.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=16, target_modules=["query", "value"],
                            lora_dropout=0.0, bias="none")
    return lib.get_peft_model(model, config)


def test_lora_guide_head_trained_saved_and_merged_like_peft(tmp_path, capsys):
    theirs = lora_guide(peft, tiny_bert())
    ours = lora_guide(lp, tiny_bert())
    assert "the head ['classifier'] is trained fully and saved" in capsys.readouterr().out
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    lp.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))  # PEFT's tensors into ours
    with torch.no_grad():
        for p in theirs.base_model.model.classifier.modules_to_save["default"].parameters():
            p.add_(0.5)
        for p in ours.base_model.model.classifier.copies["default"].parameters():  # PEFT's nesting works
            p.add_(0.5)
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
        for name, p in ours.named_parameters():
            if name.endswith("lora_B"):
                p.add_(0.1)
    theirs.eval(), ours.eval()
    torch.testing.assert_close(logits(ours), logits(theirs))
    assert sorted(lp.get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(theirs))
    status = lp.get_model_status(ours).__dict__ | {"adapter_model_type": "LoraModel"}
    assert status == peft.get_model_status(theirs).__dict__
    assert [s.__dict__ for s in lp.get_layer_status(ours)] == [s.__dict__ for s in peft.get_layer_status(theirs)]
    ours.save_pretrained(tmp_path / "ours")  # reloaded by PEFT with the trained head
    reloaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours")
    torch.testing.assert_close(logits(reloaded), logits(theirs))
    merged_theirs = theirs.merge_and_unload(safe_merge=True, adapter_names=["default"])
    merged_ours = ours.merge_and_unload(safe_merge=True, adapter_names=["default"])
    assert type(merged_ours) is type(merged_theirs)
    torch.testing.assert_close(logits(merged_ours), logits(merged_theirs))
    with pytest.raises(lp.AdapterFileError, match="never|only adapter_model.safetensors"):
        lora_guide(lp, tiny_bert()).save_pretrained(tmp_path / "x", safe_serialization=False)


def test_fresh_head_without_task_type_is_warned(tmp_path):
    from transformers import BertModel

    folder = tmp_path / "encoder"
    base = tiny_bert()
    BertModel(base.config).save_pretrained(folder)
    load = lambda: transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)  # noqa: E731
    with pytest.warns(UserWarning, match=r"classifier was newly initialised .* task_type='SEQ_CLS'"):
        lp.get_peft_model(load(), lp.LoraConfig(r=2, target_modules=["query"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        lp.get_peft_model(load(), lp.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
        lp.get_peft_model(tiny_bert(), lp.LoraConfig(r=2, target_modules=["query"]))  # built from a config: no report


# =============================================================================== patterns
def _adapted(model) -> dict[str, tuple[int, float]]:
    """``{module path: (rank, scale)}`` of every adapted layer, for either library."""
    if isinstance(model, lp.AdaptedModel):
        return {p: (a.r, a.scale) for p, a in model.adapter_layers("default")}
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.r:
            out[name] = (module.r["default"], module.scaling["default"])
    return out


PATTERN_CASES = {
    "regex_keys": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, lora_alpha=8,
                       rank_pattern={r"layers\.0\..*": 2, "k_proj|o_proj": 3},
                       alpha_pattern={r"model\.layers\.1\.self_attn\.q_proj": 5, "v_proj": 6}),
    "first_key_wins": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                           rank_pattern={r"layers\.1\..*": 2, "q_proj": 3}),
    "regex_targets": dict(target_modules=r".*\.(up|down)_proj", r=2, lora_alpha=4, use_rslora=True),
    "layers_to_transform": dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=[1], r=2, lora_alpha=8),
    "layers_pattern": dict(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers", r=2,
                           lora_alpha=8),
    "exclude": dict(target_modules="all-linear", exclude_modules=["o_proj", "lm_head"], r=2, lora_alpha=8),
    "default_targets": dict(r=2, lora_alpha=8),  # lora_alpha given: PEFT's default is 8, ours 16
}


@pytest.mark.parametrize("case", sorted(PATTERN_CASES))
def test_pattern_semantics_equal_peft(case):
    fields = PATTERN_CASES[case]
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**fields))
    ours = lp.get_peft_model(tiny_llama(), lp.LoraConfig(**fields))
    assert _adapted(ours) == _adapted(theirs)


@pytest.mark.parametrize("build", ["mistral", "qwen2", "gpt2", "bert"])
def test_default_targets_equal_peft(build):
    def make():
        torch.manual_seed(0)
        if build == "gpt2":
            return tiny_gpt2()
        if build == "bert":
            return tiny_bert()
        cfg_cls = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[build]
        cfg = cfg_cls(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32)
        return transformers.AutoModelForCausalLM.from_config(cfg)

    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=2, lora_alpha=8))
    ours = lp.get_peft_model(make(), lp.LoraConfig(r=2, lora_alpha=8))
    assert _adapted(ours) == _adapted(theirs) and _adapted(ours)


# =============================================================================== several adapters, mixed batches
def test_load_several_adapters_and_mixed_batches_equal_peft(tmp_path):
    for i, cfg in enumerate([lp.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                             lp.LavaConfig(r=3, alpha=6, target_modules=["k_proj", "down_proj", "embed_tokens"])]):
        model = lp.get_peft_model(tiny_llama(), cfg)
        randomize_adapters(model, seed=i)
        model.save_pretrained(tmp_path / f"a{i}")
    runs = {}
    for lib in (peft, lp):  # PEFT's "load adapters" + mixed-batch guide, only the import differs
        model = lib.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a0", adapter_name="adapter1")
        model.load_adapter(tmp_path / "a1", adapter_name="adapter2")
        model.set_adapter("adapter2")
        single = logits(model)
        mixed = logits(model, adapter_names=["adapter1", "__base__"])
        runs[lib.__name__] = (single, mixed)
    torch.testing.assert_close(runs["lava_peft"], runs["peft"])


def test_add_adapter_peft_keyword_and_selected_adapters_layout(tmp_path):
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("other", peft_config=lp.LoraConfig(r=2, target_modules=["v_proj"]))
    model.save_pretrained(tmp_path, selected_adapters=["default", "other"])
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "other")
    model.set_adapter("other")
    torch.testing.assert_close(logits(theirs), logits(model.eval()))


# =============================================================================== checkpoint format
def test_native_files_for_peft_representable_adapters_only(tmp_path):
    cases = {"lava_linear_embedding": (tiny_gpt2, lp.LavaConfig(r=3, alpha=6, target_modules=["c_attn", "wte"]), True),
             "lora_conv": (conv_net, lp.LoraConfig(r=2, target_modules=["c1", "c2"]), True),
             "lava_conv_cp": (conv_net, lp.LavaConfig(r=2, target_modules=["c1", "c2"]), False),
             "dylora": (tiny_gpt2, lp.DyLoraConfig(r=4, target_modules=["c_attn"]), False)}
    image = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    for name, (build, config, native) in cases.items():
        model = lp.adapt(build(), config)
        randomize_adapters(model, seed=2)
        model.eval()
        run = (lambda m: m(image)) if build is conv_net else logits  # noqa: E731
        folder = tmp_path / name
        model.save_pretrained(folder)
        payload = json.loads((folder / "adapter_config.json").read_text())
        keys = sorted(load_file(folder / "adapter_model.safetensors"))
        assert payload["format_version"] == 3 and payload["layout"] == ("peft" if native else "lava-peft"), name
        assert all(k.startswith("base_model.model.") for k in keys) == native, name
        with torch.no_grad():
            expected = run(model)
            torch.testing.assert_close(run(lp.AdaptedModel.from_pretrained(build(), folder)), expected, rtol=0, atol=0)
            if native:
                assert payload["peft_type"] == "LORA" and payload["method"] == config.method
                torch.testing.assert_close(run(peft.PeftModel.from_pretrained(build(), folder)), expected)
        report = json.loads(__import__("lava_peft.commands.inspect", fromlist=["x"]).json.dumps(
            __import__("lava_peft.commands.inspect", fromlist=["x"]).inspect_adapter(str(folder))))
        assert report["method"] == config.method and all(not m.startswith("base_model") for m in report["modules"])


def test_dora_keeps_our_layout_and_peft_dora_folders_load_through_the_peft_api(tmp_path):
    """DoRA adapters: native save_pretrained keeps the "lava-peft" layout (with the magnitudes) and loads back exactly;
    a HF PEFT DoRA folder loads through lp.PeftModel / lp.LoraConfig.from_pretrained with PEFT's outputs."""
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                                               use_dora=True))
    with torch.no_grad():  # B != 0 and the magnitudes away from the column norms
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.3)
            if "lora_magnitude_vector" in name:
                p.mul_(1.5)
    theirs.save_pretrained(str(tmp_path / "peft_dora"))
    expected = logits(theirs.eval())
    assert lp.LoraConfig.from_pretrained(tmp_path / "peft_dora").use_dora is True
    ours = lp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "peft_dora")
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(lp.LavaError, match="strict_base"):
        lp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "peft_dora", strict_base=True)
    ours.save_pretrained(tmp_path / "native")
    payload = json.loads((tmp_path / "native" / "adapter_config.json").read_text())
    keys = load_file(tmp_path / "native" / "adapter_model.safetensors")
    assert payload["layout"] == "lava-peft" and payload["config"]["use_dora"] is True
    assert sorted(k for k in keys if k.endswith(".dora_magnitude")) == sorted(
        f"transformer.h.{i}.{m}.dora_magnitude" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc"))
    back = lp.AdaptedModel.from_pretrained(tiny_gpt2(), tmp_path / "native", strict_base=True)
    torch.testing.assert_close(logits(back), logits(ours), rtol=0, atol=0)


def test_format_v1_fixture_loads():
    """Folders written by the format-1 writer (before this change) load with the outputs they had."""
    expected = load_file(FIXTURES / "expected.safetensors")
    for name, build in [("lora_bert", tiny_bert), ("lava_bert_embedding", tiny_bert), ("lava_conv", conv_net)]:
        x = expected["image"] if name == "lava_conv" else expected["ids"]
        run = (lambda m: m(x)) if build is conv_net else (lambda m: logits(m, x))  # noqa: E731
        base = build()
        with torch.no_grad():
            torch.testing.assert_close(run(base), expected[f"{name}.base"], rtol=0, atol=0)  # the same base model
            model = lp.AdaptedModel.from_pretrained(base, FIXTURES / name)
            torch.testing.assert_close(run(model), expected[f"{name}.adapted"], rtol=0, atol=0)
    # format 1's pattern rule (suffix keys before regexes) is kept for its files: layer.1's query keeps alpha 2.0
    model = lp.AdaptedModel.from_pretrained(tiny_bert(), FIXTURES / "lora_bert")
    scales = {p: a.scale for p, a in model.adapter_layers("default")}
    assert scales["bert.encoder.layer.1.attention.self.query"] == 2.0 / 4
    assert scales["bert.encoder.layer.1.attention.self.value"] == 4.0 / 4
    assert scales["bert.encoder.layer.0.attention.self.query"] == 2.0 / 2


# =============================================================================== k-bit preparation
def test_prepare_model_for_kbit_training_matches_peft():
    def run(lib):
        model = tiny_llama().to(torch.bfloat16)
        model.is_loaded_in_4bit = True  # what transformers sets on a bitsandbytes model: the checkpointing path
        lib.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": True})
        return ({n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()},
                model.is_gradient_checkpointing, model.get_input_embeddings()(IDS).requires_grad)

    assert run(lp) == run(peft)


# =============================================================================== Trainer, default arguments
class TextRows(torch.utils.data.Dataset):
    """Rows with the model's inputs plus a text column the Trainer must drop (the default collator cannot
    batch strings)."""

    def __init__(self, n=8):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 60, (n, 6), generator=gen)
        self.labels = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i], "sentence": f"row {i}"}


@pytest.mark.parametrize("how", ["LavaHFTrainer", "callback"])
def test_trainer_with_default_arguments_trains_and_saves_adapter_files_only(tmp_path, how):
    from lava_peft.train.hf import LavaHFTrainer, LavaTrainerCallback

    model = lp.get_peft_model(tiny_bert(), lp.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    before = {k: v.clone() for k, v in lp.get_peft_model_state_dict(model).items()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=1, use_cpu=True,
                                          report_to=[], disable_tqdm=True)  # remove_unused_columns=True (default)
    if how == "LavaHFTrainer":
        trainer = LavaHFTrainer(model=model, args=args, train_dataset=TextRows())
    else:
        trainer = transformers.Trainer(model=model, args=args, train_dataset=TextRows(),
                                       callbacks=[LavaTrainerCallback()])
    trainer.train()
    after = lp.get_peft_model_state_dict(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the adapter and the head trained
    for step in (1, 2):
        folder = tmp_path / f"checkpoint-{step}"
        assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    last = tmp_path / "checkpoint-2"
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(tiny_bert(), last)), logits(model.eval()))


def test_forward_signature_is_the_base_models():
    import inspect

    model = lp.get_peft_model(tiny_bert(), lp.LoraConfig(r=2, target_modules=["query"]))
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(params)
    assert re.search(r"adapter_names=None", str(inspect.signature(model.forward)))


def test_inference_mode_and_is_trainable_freeze_like_peft(tmp_path):
    counts = {}
    for lib in (peft, lp):
        config = lib.LoraConfig(r=2, lora_alpha=4, target_modules=["query"], inference_mode=True)
        frozen = lib.get_peft_model(tiny_bert(), config)
        frozen.save_pretrained(tmp_path / lib.__name__)
        loaded = lib.PeftModel.from_pretrained(tiny_bert(), tmp_path / lib.__name__, is_trainable=True)
        counts[lib.__name__] = (frozen.get_nb_trainable_parameters(), loaded.get_nb_trainable_parameters())
    assert counts["lava_peft"] == counts["peft"] and counts["peft"][0][0] == 0 and counts["peft"][1][0] > 0
