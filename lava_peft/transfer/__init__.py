"""Trans-LoRA: move a trained adapter to another base LM with (nearly) no original data.

Pipeline (``lava transfer``, :class:`TransferRun`): source adapter on real data, a
discriminator adapter (real vs source-generated inputs), synthetic inputs sampled from the
target with 5 seed examples and filtered by the discriminator, then distillation of
source + adapter into a new adapter on the target (logit KD within one tokenizer,
sequence-level KD across tokenizers).  See docs/transfer.md.
"""

from .discriminator import discriminator_task, judge, train_discriminator
from .distill import KD_MODES, choose_kd_mode, distill, logit_kd_loss, teacher_answers
from .errors import TransferError
from .pipeline import DISTILL_INPUTS, TaskData, TransferConfig, TransferRun, check_config, load_lm
from .synthetic import FilterResult, few_shot_prompt, read_jsonl, rejection_sample, sample_inputs, write_jsonl
from .task import SENTIMENT, CompletionTask, Example, accuracy, choice_logprobs

__all__ = [
    "CompletionTask", "DISTILL_INPUTS", "Example", "FilterResult", "KD_MODES", "SENTIMENT", "TaskData",
    "TransferConfig", "TransferError", "TransferRun", "accuracy", "check_config", "choice_logprobs", "choose_kd_mode",
    "discriminator_task", "distill", "few_shot_prompt", "judge", "load_lm", "logit_kd_loss", "read_jsonl",
    "rejection_sample", "sample_inputs", "teacher_answers", "train_discriminator", "write_jsonl",
]
