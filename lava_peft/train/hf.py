"""Hugging Face ``transformers.Trainer`` interop.

Two ways, pick one:

* :class:`LavaHFTrainer` (or mix :class:`LavaLossMixin` into your own Trainer subclass):
  ``compute_loss`` adds ``model.regularization_loss()``; checkpoints and ``save_model``
  hold only the adapter files (``adapter_config.json`` + ``adapter_model.safetensors``),
  and ``resume_from_checkpoint`` / ``load_best_model_at_end`` load them back.
* :class:`LavaTrainerCallback` with a stock ``transformers.Trainer``: adds the
  regularizer to the loss the model returns (a forward hook on the adapted model,
  active only in training mode), writes our adapter files into every checkpoint
  folder (replacing the full ``model.safetensors`` the Trainer writes for a model that is not a
  ``PreTrainedModel``) and into ``output_dir`` at the end.  Resuming a checkpoint or
  ``load_best_model_at_end`` need :class:`LavaHFTrainer` (the stock Trainer looks for full weights).

Default ``TrainingArguments`` work with both (``remove_unused_columns=True`` included): the
adapted model's ``forward`` shows the base model's signature, so the Trainer keeps the columns the
base model takes, as it does for PEFT models.
"""

from __future__ import annotations

import os

from transformers import Trainer, TrainerCallback

from ..model import AdaptedModel
from .checkpoint import load_trainable

FULL_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
"""What ``transformers.Trainer`` writes for a model that is not a ``PreTrainedModel`` (its whole state dict)."""


def find_adapted_model(model) -> AdaptedModel | None:
    """The :class:`AdaptedModel` inside DDP / accelerate / compile wrappers, or None."""
    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, AdaptedModel):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        seen += 1
    return None


class LavaLossMixin:
    """Adds the adapters' regularization to ``compute_loss``; saves/loads adapter files only."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # outputs only when asked: TRL's SFTTrainer otherwise runs a second forward pass to build logits
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        adapted = find_adapted_model(model)
        if adapted is not None and model.training:
            reg = adapted.regularization_loss()
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                # the loss is already normalised over the accumulated batch: add the term once per step
                reg = reg / self.current_gradient_accumulation_steps
            loss = loss + reg.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir=None, state_dict=None):
        adapted = find_adapted_model(self.model)
        if adapted is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        adapted.save_pretrained(output_dir, adapter_name=adapted.active_adapter)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        adapted = find_adapted_model(model if model is not None else self.model)
        if adapted is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_trainable(adapted, resume_from_checkpoint)

    def _load_best_model(self):
        adapted = find_adapted_model(self.model)
        if adapted is None:
            return super()._load_best_model()
        load_trainable(adapted, self.state.best_model_checkpoint)


class LavaHFTrainer(LavaLossMixin, Trainer):
    """``transformers.Trainer`` for :class:`AdaptedModel`: regularized loss, adapter-only checkpoints."""


class LavaTrainerCallback(TrainerCallback):
    """Use with a stock ``transformers.Trainer``: ``Trainer(..., callbacks=[LavaTrainerCallback()])``.

    Adds ``regularization_loss()`` to ``outputs.loss`` of every training forward pass of the
    adapted model, so that it counts once per optimizer step under gradient accumulation
    (the Trainer then backpropagates it), and writes adapter files into each
    ``checkpoint-N`` folder and, at the end of training, into ``output_dir``.
    """

    def __init__(self, add_regularization: bool = True, save_adapter: bool = True):
        self.add_regularization = add_regularization
        self.save_adapter = save_adapter
        self._handle = None
        self._model = None
        self._accumulation_steps = 1

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        adapted = find_adapted_model(model)
        if adapted is None:
            raise TypeError(
                "LavaTrainerCallback needs the Trainer's model to be a lava_peft AdaptedModel "
                "(model = lp.adapt(model, config)); got " + type(model).__name__
            )
        self._model = adapted
        self._accumulation_steps = max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
        if self.add_regularization and self._handle is None:
            self._handle = adapted.register_forward_hook(self._add_reg, with_kwargs=True)

    def _add_reg(self, module, args, kwargs, output):
        """Add the regularizer once per optimizer step, whatever the gradient accumulation.

        The Trainer divides the loss by the accumulation steps itself, except when it passed
        ``num_items_in_batch`` to the model (the loss is then taken as normalised over the
        whole accumulated batch); in that case the term is divided here instead.  (The last,
        shorter window of an epoch is divided by the configured step count.)
        """
        if not module.training:
            return output
        loss = output.get("loss") if isinstance(output, dict) else None
        if loss is None:
            return output
        reg = module.regularization_loss()
        if kwargs.get("num_items_in_batch") is not None:
            reg = reg / self._accumulation_steps
        output["loss"] = loss + reg.to(loss.dtype)
        return output

    def on_save(self, args, state, control, **kwargs):
        if self.save_adapter and self._model is not None and state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self._model.save_pretrained(folder, adapter_name=self._model.active_adapter)
            for name in FULL_MODEL_FILES:  # the Trainer's copy of the whole model: the adapter files replace it
                path = os.path.join(folder, name)
                if os.path.isfile(path):
                    os.remove(path)

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.save_adapter and self._model is not None and state.is_world_process_zero:
            self._model.save_pretrained(args.output_dir, adapter_name=self._model.active_adapter)
