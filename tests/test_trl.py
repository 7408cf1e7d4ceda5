"""TRL as a real client: ``trl.SFTTrainer`` trains a lava-peft adapted tiny Llama.

The adapted model is passed as ``model=`` (TRL's ``peft_config=`` takes only ``peft.PeftConfig``
instances, see docs/your-data.md); :class:`~lava_peft.train.hf.LavaLossMixin` adds the LAVA
regularizer and makes ``save_model`` write our adapter files only.
"""

from __future__ import annotations

import torch

import lava_peft as lp
from lava_peft.train.hf import LavaLossMixin

from _tiny_lm import tiny_llama_lm, tiny_tokenizer


def test_sft_trainer_trains_saves_and_reloads_a_lava_adapter(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    class LavaSFTTrainer(LavaLossMixin, SFTTrainer):
        pass

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = lp.adapt(tiny_llama_lm(tok), lp.LavaConfig(r=4, target_modules="all-linear", orth_lambda=0.1))
    rows = [{"prompt": f"Classify: {'dull' if i % 2 else 'warm'} film {i}. Answer:",
             "completion": " negative" if i % 2 else " positive"} for i in range(32)]
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                     report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, max_length=64, seed=0, bf16=False,
                     dataloader_num_workers=0, disable_tqdm=True)
    # bf16=False: with TRL's default bf16=True, accelerate wraps model.forward in autocast for good, and the
    # in-memory model would then differ from a fresh reload by bf16 rounding
    trainer = LavaSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert result.global_step == 4
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) == len(before) > 0  # every adapter tensor was trained
    trainer.save_model(str(tmp_path / "final"))
    files = sorted(p.name for p in (tmp_path / "final").iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files and "model.safetensors" not in files
    # reload into a fresh base: identical outputs
    ids = torch.tensor([tok("Classify: warm film 3. Answer: positive")["input_ids"]])
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        reloaded = lp.AdaptedModel.from_pretrained(tiny_llama_lm(tok), str(tmp_path / "final"))(input_ids=ids).logits
        base = tiny_llama_lm(tok)(input_ids=ids).logits
    assert torch.equal(trained, reloaded)
    assert not torch.allclose(trained, base, atol=1e-4)


# =============================================================================== peft_config= with lava-peft configs
def _sft_args(tmp_path, name):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, max_length=64, seed=0, bf16=False,
                     dataloader_num_workers=0, disable_tqdm=True)


def _dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"Classify: {'dull' if i % 2 else 'warm'} film {i}. Answer:" for i in range(12)],
                              "completion": [" negative" if i % 2 else " positive" for i in range(12)]})


def test_peft_config_with_a_lava_peft_config_through_our_sft_trainer(tmp_path):
    """``from lava_peft.train.trl import SFTTrainer``: TRL's trainer taking ``peft_config=lp.LoraConfig(...)``,
    with the model given as an instance and as a folder (loaded as TRL loads it)."""
    from lava_peft.train.trl import SFTTrainer
    from _tiny_lm import save_tiny_lm_dir

    tok = tiny_tokenizer()
    folder = save_tiny_lm_dir(tmp_path / "base")
    ids = torch.tensor([tok("Classify: warm film 3. Answer: positive")["input_ids"]])
    for name, model in (("instance", tiny_llama_lm(tok)), ("folder", str(folder))):
        config = lp.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=_sft_args(tmp_path, name), train_dataset=_dataset(),
                             processing_class=tok, peft_config=config)
        adapted = trainer.model
        assert isinstance(adapted, lp.AdaptedModel) and list(adapted.peft_config) == ["default"]
        trainable = {n: p.detach().clone() for n, p in adapted.named_parameters() if p.requires_grad}
        assert len(trainable) == 8 and all(".adapters.default.lora_" in n for n in trainable)  # 2 layers × q, v × A, B
        assert trainer.train().global_step == 3
        assert all(not torch.equal(p, trainable[n]) for n, p in adapted.named_parameters() if n in trainable)
        trainer.save_model(str(tmp_path / f"{name}-final"))
        files = sorted(p.name for p in (tmp_path / f"{name}-final").iterdir())
        assert "adapter_model.safetensors" in files and "model.safetensors" not in files
        adapted.eval()
        with torch.no_grad():
            reloaded = lp.PeftModel.from_pretrained(tiny_llama_lm(tok), str(tmp_path / f"{name}-final"))
            assert torch.equal(adapted(input_ids=ids).logits, reloaded(input_ids=ids).logits)
            assert not torch.allclose(adapted(input_ids=ids).logits, tiny_llama_lm(tok)(input_ids=ids).logits, atol=1e-4)


def test_stock_sft_trainer_refuses_our_config_and_takes_the_adapted_model(tmp_path):
    """TRL's own check (``isinstance(peft_config, peft.PeftConfig)``) refuses our config with its TypeError; the
    documented stock form, ``model=lp.get_peft_model(...)``, trains the adapter."""
    import pytest
    from trl import SFTTrainer

    tok = tiny_tokenizer()
    with pytest.raises(TypeError, match="peft.PeftConfig"):
        SFTTrainer(model=tiny_llama_lm(tok), args=_sft_args(tmp_path, "refused"), train_dataset=_dataset(),
                   processing_class=tok, peft_config=lp.LoraConfig(target_modules=["q_proj"]))
    model = lp.get_peft_model(tiny_llama_lm(tok), lp.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    SFTTrainer(model=model, args=_sft_args(tmp_path, "stock"), train_dataset=_dataset(), processing_class=tok).train()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_base_model_call_runs_the_adapted_backbone():
    """TRL's distillation trainers call ``model.base_model(**inputs).last_hidden_state`` (the backbone without the
    LM head): on an adapted model that is the wrapped model's backbone with the adapters in it."""
    tok = tiny_tokenizer()
    model = lp.get_peft_model(tiny_llama_lm(tok), lp.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, adapter in model.adapter_layers("default"):
            adapter.lora_B.normal_()
    ids = torch.tensor([tok("the quick brown fox")["input_ids"]])
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state
        assert torch.equal(hidden, model.model.model(input_ids=ids).last_hidden_state)
        logits = model.model.lm_head(hidden)
        assert torch.equal(logits, model(input_ids=ids).logits)
        assert not torch.allclose(hidden, tiny_llama_lm(tok).model(input_ids=ids).last_hidden_state, atol=1e-4)
    assert model.base_model.model is model.model
