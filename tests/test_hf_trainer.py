"""Hugging Face ``transformers.Trainer`` interop on the real MiniLM-L6 and Rotten Tomatoes snippets.

* ``LavaTrainerCallback`` with a stock ``Trainer``: the regularizer is in the loss the
  Trainer backpropagates, and our adapter files land in every checkpoint and output_dir.
* ``LavaHFTrainer``: the same loss; checkpoints hold only adapter files (no full model),
  and ``resume_from_checkpoint`` continues exactly where the uninterrupted run would be.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import transformers  # a dev dependency, installed by `make test`: a missing one fails, never skips

import lava_peft as lp  # noqa: E402
from lava_peft.train.hf import LavaHFTrainer, LavaTrainerCallback  # noqa: E402
from lava_peft.train.tasks import load_text_data, minilm_path  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors["labels"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


@pytest.fixture(scope="module")
def setup():
    path = minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    train, _ = load_text_data(tok, 32, 16, seed=0, max_len=32)
    return path, ListDataset(train)



def make_model(path):
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # deterministic forward
    model = lp.adapt(base, lp.LavaConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                                         orth_lambda=1.0))
    with torch.no_grad():
        for _, adapter in model.adapter_layers():
            adapter.lava_U.mul_(1.3)  # so that the regularizer is clearly non-zero
    return model


def hf_args(out, **kw):
    settings = dict(max_steps=4, per_device_train_batch_size=8, learning_rate=2e-3, save_strategy="steps",
                    save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                    remove_unused_columns=False)
    return transformers.TrainingArguments(output_dir=str(out), **{**settings, **kw})


def batch_of(ds, n=8):
    return torch.utils.data.default_collate([ds[i] for i in range(n)])


def plain_loss(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return F.cross_entropy(model.model(**inputs).logits, batch["labels"])  # the base model: no hook, no reg


def test_callback_with_stock_trainer(setup, tmp_path):
    path, ds = setup
    model = make_model(path)
    callback = LavaTrainerCallback()
    trainer = transformers.Trainer(model=model, args=hf_args(tmp_path), train_dataset=ds, callbacks=[callback])
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=model)
    model.train()
    batch = batch_of(ds)
    with torch.no_grad():
        reg = model.regularization_loss()
        assert float(reg) > 0.1
        torch.testing.assert_close(trainer.compute_loss(model, batch), plain_loss(model, batch) + reg)
    trainer.train()
    for folder in ("checkpoint-2", "checkpoint-4", "."):
        assert (tmp_path / folder / "adapter_model.safetensors").is_file(), folder
        assert (tmp_path / folder / "adapter_config.json").is_file(), folder
    reloaded = lp.AdaptedModel.from_pretrained(
        transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), str(tmp_path))
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert float(model.regularization_loss()) < float(reg)  # the regularizer was optimised too
    model.train()
    with torch.no_grad():  # the hook is removed after training
        torch.testing.assert_close(model(**batch).loss, plain_loss(model, batch))


def test_lava_hf_trainer_adapter_only_checkpoints_and_exact_resume(setup, tmp_path):
    path, ds = setup
    model = make_model(path)
    trainer = LavaHFTrainer(model=model, args=hf_args(tmp_path / "a"), train_dataset=ds)
    model.train()
    batch = batch_of(ds)
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, batch), plain_loss(model, batch) + model.regularization_loss())
    trainer.train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= names
    assert "model.safetensors" not in names and "pytorch_model.bin" not in names  # no full-model copy
    final = {k: v.clone() for k, v in model.adapter_state_dict().items()}

    resumed_model = make_model(path)
    resumed = LavaHFTrainer(model=resumed_model, args=hf_args(tmp_path / "a"), train_dataset=ds)
    resumed.train(resume_from_checkpoint=str(ckpt))
    again = resumed_model.adapter_state_dict()
    init = make_model(path).adapter_state_dict()
    assert any(not torch.allclose(final[k], init[k]) for k in final)
    for k in final:
        torch.testing.assert_close(again[k], final[k], rtol=1e-5, atol=1e-6, msg=k)


def test_callback_counts_the_regularizer_once_per_step_under_gradient_accumulation(setup, tmp_path):
    """With accumulation, the callback and LavaHFTrainer train identically, and the hook scales the term."""
    path, ds = setup
    args = dict(gradient_accumulation_steps=2, per_device_train_batch_size=4, max_steps=2, save_strategy="no",
                optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0)
    via_callback = make_model(path)
    callback = LavaTrainerCallback(save_adapter=False)
    trainer = transformers.Trainer(model=via_callback, args=hf_args(tmp_path / "cb", **args), train_dataset=ds,
                                   callbacks=[callback])
    # the hook itself: the full term without num_items_in_batch, 1/accumulation with it
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=via_callback)
    via_callback.train()
    batch = batch_of(ds, 4)
    with torch.no_grad():
        reg, plain = via_callback.regularization_loss(), plain_loss(via_callback, batch)
        torch.testing.assert_close(via_callback(**batch).loss, plain + reg)
        torch.testing.assert_close(via_callback(**batch, num_items_in_batch=torch.tensor(8)).loss, plain + reg / 2)
    callback.on_train_end(trainer.args, trainer.state, trainer.control)
    trainer.train()

    via_mixin = make_model(path)
    LavaHFTrainer(model=via_mixin, args=hf_args(tmp_path / "mx", **args), train_dataset=ds).train()
    init = make_model(path).adapter_state_dict()
    a, b = via_callback.adapter_state_dict(), via_mixin.adapter_state_dict()
    assert any(not torch.allclose(a[k], init[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
