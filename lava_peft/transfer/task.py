"""A classification task posed as a text completion, and the model-side helpers it needs.

An example is ``(text, label)``; the model sees ``prompt = template.format(text=text)``
and the answer is ``choices[label]``.  The offline default is Rotten Tomatoes sentiment::

    Review: <snippet>
    Sentiment: positive        (label 1 = fresh;  " negative" for label 0 = rotten)

Every sequence starts with the tokenizer's EOS token (the zoo LMs were pretrained on
documents separated by EOS, so it marks "start of a document"), then the prompt tokens,
then the answer tokens, each part tokenized on its own, so the answer's ids do not depend
on the text before it.

Prediction compares the answer log-likelihoods
``log p(choice_c | prompt) = Σ_j log p(a_cj | prompt, a_c<j)`` and takes the arg max.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from .errors import TransferError

__all__ = [
    "CompletionTask", "Example", "SENTIMENT", "encode_completions", "answer_loss",
    "choice_logprobs", "predict", "accuracy", "load_sentiment_data", "check_tokenizer",
]


class Example(NamedTuple):
    text: str
    label: int


@dataclass(frozen=True)
class CompletionTask:
    """``template`` (with ``{text}``), the answer strings ``choices`` and a ``name`` for prompts."""

    name: str
    template: str
    choices: tuple[str, ...]

    def prompt(self, text: str) -> str:
        return self.template.format(text=text)


SENTIMENT = CompletionTask("movie reviews", "Review: {text}\nSentiment:", (" negative", " positive"))


def check_tokenizer(tokenizer, role: str) -> None:
    """Refuse a tokenizer without EOS or pad token (sequences start with EOS, batches are padded)."""
    if tokenizer.eos_token_id is None:
        raise TransferError(
            f"the {role} tokenizer has no EOS token; set one (tokenizer.eos_token = ...) before the transfer"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def encode_completions(tokenizer, prompts: Sequence[str], answers: Sequence[str], device="cpu"):
    """Right-padded batch of ``[EOS] + prompt + answer``.

    Returns ``(input_ids, attention_mask, answer_mask)``; ``answer_mask[i, t]`` is 1 where
    token ``t`` of row ``i`` belongs to the answer (so position ``t - 1`` predicts it).
    """
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    rows = [[tokenizer.eos_token_id] + p + a for p, a in zip(p_ids, a_ids)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    amask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, a) in enumerate(zip(rows, a_ids)):
        ids[i, : len(row)] = torch.tensor(row)
        attn[i, : len(row)] = 1
        amask[i, len(row) - len(a) : len(row)] = True
    return ids.to(device), attn.to(device), amask.to(device)


def token_logprobs(model, ids, attn):
    """``log p(ids[:, t] | ids[:, <t])`` for ``t >= 1``, shape ``(B, T - 1)``, and the logits."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logp, logits


def answer_loss(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], device="cpu") -> torch.Tensor:
    """Mean next-token cross entropy over the answer tokens (supervised and sequence-level KD)."""
    ids, attn, amask = encode_completions(tokenizer, prompts, answers, device)
    logp, _ = token_logprobs(model, ids, attn)
    mask = amask[:, 1:]
    return -(logp * mask).sum() / mask.sum()


@torch.no_grad()
def choice_logprobs(model, tokenizer, task: CompletionTask, texts: Sequence[str], batch_size: int = 64,
                    device="cpu") -> torch.Tensor:
    """``(N, C)`` summed log-likelihood of each answer choice after each text's prompt."""
    was_training = model.training
    model.eval()
    out = torch.empty(len(texts), len(task.choices))
    for start in range(0, len(texts), batch_size):
        prompts = [task.prompt(t) for t in texts[start : start + batch_size]]
        for c, choice in enumerate(task.choices):
            ids, attn, amask = encode_completions(tokenizer, prompts, [choice] * len(prompts), device)
            logp, _ = token_logprobs(model, ids, attn)
            out[start : start + len(prompts), c] = (logp * amask[:, 1:]).sum(-1).cpu()
    model.train(was_training)
    return out


def predict(model, tokenizer, task: CompletionTask, texts: Sequence[str], **kw) -> list[int]:
    return choice_logprobs(model, tokenizer, task, texts, **kw).argmax(-1).tolist()


def accuracy(model, tokenizer, task: CompletionTask, examples: Sequence[Example], **kw) -> float:
    """Fraction of ``examples`` whose highest-likelihood choice is the label."""
    if not examples:
        raise TransferError("accuracy needs at least one example")
    pred = predict(model, tokenizer, task, [e.text for e in examples], **kw)
    return sum(int(p == e.label) for p, e in zip(pred, examples)) / len(examples)


def _balanced(pool: list[Example], n: int, rng: random.Random) -> list[Example]:
    by_label = {0: [e for e in pool if e.label == 0], 1: [e for e in pool if e.label == 1]}
    half = n // 2
    picked = rng.sample(by_label[0], half) + rng.sample(by_label[1], n - half)
    rng.shuffle(picked)
    return picked


def load_sentiment_data(n_train: int, n_test: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Rotten Tomatoes by-movie split (``load_rotten_tomatoes(seed=0)``, the split the zoo LMs
    were pretrained around): ``n_train`` label-balanced training examples drawn with ``seed``
    and a label-balanced test set of ``n_test`` (fixed, seed 0), so chance accuracy is 50 %.
    Balanced training keeps an adapter from scoring above chance on the class prior alone."""
    from ..data import load_rotten_tomatoes

    train, test = load_rotten_tomatoes(seed=0)
    train_pool = [Example(s.text, s.label) for s in train]
    test_pool = [Example(s.text, s.label) for s in test]
    if n_train > len(train_pool) or n_test > len(test_pool):
        raise TransferError(f"n_train <= {len(train_pool)} and n_test <= {len(test_pool)} are available")
    return _balanced(train_pool, n_train, random.Random(seed)), _balanced(test_pool, n_test, random.Random(0))
