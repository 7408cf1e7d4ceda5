"""Training: a plain PyTorch :class:`Trainer`, Hugging Face ``Trainer`` interop, metrics and plots.

    import lava_peft as lp
    trainer = lp.Trainer(model, lp.TrainingArguments(output_dir="runs/x"), train_data, eval_data)
    trainer.train()

``LavaTrainerCallback`` / ``LavaHFTrainer`` (``lava_peft.train.hf``) import transformers
only when used.
"""

from .args import TrainingArguments
from .checkpoint import RunDirError, latest_checkpoint, load_trainable, save_trainable, set_seed
from .metrics import MetricsLogger, read_metrics
from .plot import plot_metrics
from .trainer import Trainer, classification_loss, default_forward

__all__ = [
    "LavaHFTrainer",
    "LavaTrainerCallback",
    "MetricsLogger",
    "RunDirError",
    "Trainer",
    "TrainingArguments",
    "classification_loss",
    "default_forward",
    "latest_checkpoint",
    "load_trainable",
    "plot_metrics",
    "read_metrics",
    "save_trainable",
    "set_seed",
]


def __getattr__(name):  # lazy: transformers is an optional dependency
    if name in ("LavaTrainerCallback", "LavaHFTrainer", "LavaLossMixin"):
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
