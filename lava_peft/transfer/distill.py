"""Distillation of the teacher (source LM + source adapter) into the student (target LM +
a new adapter of any type) on task inputs (synthetic, seeds, random text, ...).

Two modes, chosen by :func:`choose_kd_mode`:

* ``"logit"`` (teacher and student share the tokenizer and the output vocabulary): each
  input becomes ``[EOS] + prompt + a*`` with ``a*`` the teacher's answer (its
  highest-likelihood choice), and the student matches the teacher's next-token
  distributions at the answer positions (``all_tokens=True``: at every position)::

      L = T² · mean_{positions t} KL( softmax(z_teacher,t / T) ‖ softmax(z_student,t / T) )

* ``"sequence"`` (different tokenizers; logits live on different vocabularies): the
  teacher labels each input with its answer ``a*``, the completion it would give, and
  the student is trained with cross entropy on ``a*`` under *its own* tokenizer.  For a
  task with a closed answer set the teacher's completion is its highest-likelihood choice
  (greedy decoding restricted to the valid answers).
"""

from __future__ import annotations

from typing import Sequence

import torch

import lava_peft as lp

from .errors import TransferError
from .task import CompletionTask, answer_loss, choice_logprobs, encode_completions
from .training import train_adapter

__all__ = ["KD_MODES", "logit_kd_loss", "choose_kd_mode", "teacher_answers", "distill"]

KD_MODES = ("auto", "logit", "sequence")


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """``T² · Σ_masked KL(p_t ‖ p_s) / #masked`` with ``p = softmax(logits / T)`` over the last dim."""
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    mask = mask.to(kl.dtype)
    return temperature**2 * (kl * mask).sum() / mask.sum()


def _output_size(model) -> int | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)


def choose_kd_mode(requested: str, teacher_tokenizer, student_tokenizer, teacher_model=None, student_model=None) -> str:
    """``"logit"`` when both sides share tokenizer vocabulary and output size, else ``"sequence"``.

    Raises :class:`TransferError` for an unknown mode, or when ``"logit"`` is requested for
    models whose vocabularies differ.
    """
    if requested not in KD_MODES:
        raise TransferError(f"unknown distillation mode {requested!r}; choose one of {list(KD_MODES)}")
    same_vocab = teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()
    if same_vocab and teacher_model is not None and student_model is not None:
        same_vocab = _output_size(teacher_model) == _output_size(student_model)
    if requested == "logit" and not same_vocab:
        raise TransferError(
            "logit distillation needs the source and the target to share one tokenizer and output vocabulary; "
            "these differ. Use kd='sequence' (or 'auto', which picks it) for a cross-tokenizer transfer"
        )
    if requested == "auto":
        return "logit" if same_vocab else "sequence"
    return requested


def teacher_answers(teacher, tokenizer, task: CompletionTask, texts: Sequence[str]) -> list[int]:
    """The teacher's answer (index of its highest-likelihood choice) for each input."""
    device = next(teacher.parameters()).device
    return choice_logprobs(teacher, tokenizer, task, list(texts), device=device).argmax(-1).tolist()


def distill(teacher, teacher_tokenizer, student: lp.AdaptedModel, student_tokenizer, task: CompletionTask,
            texts: Sequence[str], *, mode: str = "auto", all_tokens: bool = False, temperature: float = 1.0,
            epochs: int = 10, lr: float = 1e-3, batch_size: int = 8, seed: int = 0, progress: bool = True) -> dict:
    """Train the student's active adapter to imitate the teacher on ``texts``; returns a report."""
    mode = choose_kd_mode(mode, teacher_tokenizer, student_tokenizer, teacher, student)
    texts = [t for t in texts if t]
    if not texts:
        raise TransferError("distillation needs at least one non-empty input text")
    labels = teacher_answers(teacher, teacher_tokenizer, task, texts)
    data = list(zip(texts, labels))
    device = next(student.parameters()).device
    teacher.eval()

    def sequence_loss(batch):
        return answer_loss(student, student_tokenizer, [task.prompt(t) for t, _ in batch],
                           [task.choices[y] for _, y in batch], device)

    def logit_loss(batch):
        ids, attn, amask = encode_completions(student_tokenizer, [task.prompt(t) for t, _ in batch],
                                              [task.choices[y] for _, y in batch], device)
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=attn).logits[:, :-1]
        s_logits = student(input_ids=ids, attention_mask=attn).logits[:, :-1]
        mask = attn[:, 1:].bool() if all_tokens else amask[:, 1:]
        return logit_kd_loss(s_logits, t_logits, mask, temperature)

    losses = train_adapter(student, data, logit_loss if mode == "logit" else sequence_loss, epochs=epochs, lr=lr,
                           batch_size=batch_size, seed=seed, desc=f"distill ({mode} KD)", progress=progress)
    return {"mode": mode, "all_tokens": all_tokens if mode == "logit" else None, "n_inputs": len(texts),
            "teacher_label_counts": [labels.count(c) for c in range(len(task.choices))],
            "steps": len(losses), "final_loss": losses[-1] if losses else None}
