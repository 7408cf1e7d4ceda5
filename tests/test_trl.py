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
