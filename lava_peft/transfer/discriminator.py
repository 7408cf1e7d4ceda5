"""The Trans-LoRA discriminator: an adapter on the source LM answering " yes" / " no" to
"is this text from <task>?" through the LM head.

Template ``t(x) = x + "\\nIs the above text from the <task> dataset? Answer:"``.  Training
maximizes (as the paper's objective)

    E_{x ∈ real}[log p_φ(" yes" | t(x))] + E_{x ~ source LM}[log p_φ(" no" | t(x))]

i.e. the answer cross entropy of :func:`task.answer_loss` with answer " yes" for real
inputs and " no" for inputs the *source* model generated (the target is unknown when the
discriminator is trained).  A text is judged real when ``p(yes) > p(no)``, i.e. when
``log p(" yes" | t(x)) > log p(" no" | t(x))`` (summed over the answer tokens).
"""

from __future__ import annotations

import random
from typing import Sequence

import lava_peft as lp

from .task import CompletionTask, accuracy, answer_loss, choice_logprobs, Example
from .training import train_adapter

__all__ = ["discriminator_task", "train_discriminator", "judge"]


def discriminator_task(task_name: str) -> CompletionTask:
    """Label 1 = " yes" (real), label 0 = " no" (generated)."""
    return CompletionTask(
        f"{task_name} discriminator", "{text}\nIs the above text from the " + task_name + " dataset? Answer:",
        (" no", " yes"),
    )


def train_discriminator(model: lp.AdaptedModel, tokenizer, task_name: str, real: Sequence[str], fake: Sequence[str], *,
                        epochs: int, lr: float, batch_size: int = 8, seed: int = 0, held_out: float = 0.2,
                        progress: bool = True) -> dict:
    """Train the active adapter of ``model`` as the discriminator; returns train/held-out accuracy.

    ``held_out`` of each side is kept aside (seeded) to measure how well real and
    generated texts are told apart on texts the discriminator never saw.
    """
    dtask = discriminator_task(task_name)
    data = [Example(t, 1) for t in real] + [Example(t, 0) for t in fake]
    random.Random(seed).shuffle(data)
    n_held = int(round(held_out * len(data)))
    held, train = data[:n_held], data[n_held:]
    device = next(model.parameters()).device

    def loss_fn(batch):
        return answer_loss(model, tokenizer, [dtask.prompt(e.text) for e in batch],
                           [dtask.choices[e.label] for e in batch], device)

    losses = train_adapter(model, train, loss_fn, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                           desc="discriminator", progress=progress)
    return {
        "train_accuracy": accuracy(model, tokenizer, dtask, train, device=device),
        "held_out_accuracy": accuracy(model, tokenizer, dtask, held, device=device) if held else None,
        "n_real": len(real), "n_fake": len(fake), "final_loss": losses[-1] if losses else None,
    }


def judge(model, tokenizer, task_name: str, texts: Sequence[str], batch_size: int = 64) -> list[tuple[float, float]]:
    """``(log p(yes), log p(no))`` for each text under the active discriminator adapter."""
    device = next(model.parameters()).device
    lp_ = choice_logprobs(model, tokenizer, discriminator_task(task_name), list(texts), batch_size, device)
    return [(float(row[1]), float(row[0])) for row in lp_]
