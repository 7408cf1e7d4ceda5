"""Synthetic task inputs: few-shot sampling from a causal LM, and the discriminator filter.

**Generator.**  The prompt is the seed inputs, one per line, in a fresh random order for
each sample, followed by a newline; the model samples a continuation (temperature,
nucleus ``top_p``) and the text up to the first newline is the candidate.  A *base* LM
(no instruction tuning, as every zoo model) does not follow an instruction such as
"write a movie review": it simply continues the list it is shown, which is why the seeds
are shown as a plain list of inputs in the format they had in the data.

**Filter.**  Rejection sampling: candidates are proposed in batches and judged; a candidate
is kept when the discriminator's ``log p(yes) > log p(no)``.  Proposal stops as soon as
``n`` candidates are accepted (candidates after the ``n``-th accepted one in the last batch
are dropped unseen), or when ``max_candidates`` were proposed.  Empty candidates are
rejected without being judged.  Every candidate is recorded, in proposal order.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..io import atomic_write_bytes
from .errors import TransferError

__all__ = ["few_shot_prompt", "sample_inputs", "rejection_sample", "FilterResult", "write_jsonl", "read_jsonl"]


def few_shot_prompt(seed_texts: Sequence[str], rng: random.Random) -> str:
    """The seed inputs in random order, one per line, ending with a newline."""
    order = list(seed_texts)
    rng.shuffle(order)
    return "".join(t.replace("\n", " ").strip() + "\n" for t in order)


@torch.no_grad()
def sample_inputs(model, tokenizer, seed_texts: Sequence[str], n: int, *, temperature: float = 1.0, top_p: float = 0.95,
                  max_new_tokens: int = 48, batch_size: int = 32, seed: int = 0, shots: int = 5) -> list[str]:
    """``n`` candidate inputs sampled from ``model`` continuing a few-shot list.

    Each prompt shows ``shots`` texts drawn from ``seed_texts`` (all of them, reordered,
    when there are at most ``shots``).
    """
    if not seed_texts:
        raise TransferError("the generator needs at least one seed example; pass n_seeds >= 1")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = getattr(model, "config", None)
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1 << 30
    keep = positions - max_new_tokens - 1  # prompt tokens that fit before the new ones (left-truncated)
    if keep < 8:
        raise TransferError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {positions} positions")
    while len(out) < n:
        k = min(batch_size, n - len(out))
        rows = [[tokenizer.eos_token_id] + tokenizer(few_shot_prompt(rng.sample(list(seed_texts), min(shots, len(seed_texts))), rng),
                                                          add_special_tokens=False)["input_ids"]
                for _ in range(k)]
        rows = [r if len(r) <= keep + 1 else r[:1] + r[-keep:] for r in rows]
        width = max(len(r) for r in rows)
        ids = torch.full((k, width), pad, dtype=torch.long)
        attn = torch.zeros((k, width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: the continuation starts at the same column
            ids[i, width - len(r):] = torch.tensor(r)
            attn[i, width - len(r):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
                             temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for row in gen[:, width:].tolist():
            text = tokenizer.decode(row, skip_special_tokens=True)
            out.append(text.split("\n", 1)[0].strip())
    model.train(was_training)
    return out


@dataclass
class FilterResult:
    accepted: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)  # every judged/empty candidate, in order

    @property
    def acceptance_rate(self) -> float:
        return len(self.accepted) / max(1, len(self.candidates))

    def stats(self, n: int) -> dict:
        return {"requested": n, "accepted": len(self.accepted), "rejected": len(self.rejected),
                "candidates": len(self.candidates), "acceptance_rate": round(self.acceptance_rate, 4),
                "empty": sum(1 for c in self.candidates if c["text"] == ""), "complete": len(self.accepted) >= n}


def rejection_sample(propose: Callable[[int, int], list[str]], judge: Callable[[list[str]], list[tuple[float, float]]],
                     n: int, *, batch_size: int = 32, max_candidates: int | None = None,
                     progress: bool = True) -> FilterResult:
    """Keep proposed texts with ``log p(yes) > log p(no)`` until ``n`` are kept.

    ``propose(k, round)`` returns ``k`` new texts; ``judge(texts)`` their ``(log p(yes),
    log p(no))``.  ``max_candidates`` (default ``50 n``) bounds the work when few are accepted.
    """
    if n <= 0:
        raise TransferError(f"the filter needs n >= 1 accepted samples (got n={n})")
    limit = max_candidates if max_candidates is not None else 50 * n
    result = FilterResult()
    bar = tqdm(total=n, desc="synthetic (accepted)", disable=not progress, leave=False)
    rnd = 0
    while len(result.accepted) < n and len(result.candidates) < limit:
        texts = propose(min(batch_size, limit - len(result.candidates)), rnd)
        nonempty = [t for t in texts if t]
        scores = iter(judge(nonempty) if nonempty else [])
        for text in texts:
            if text:
                yes, no = next(scores)
                rec = {"index": len(result.candidates), "round": rnd, "text": text, "logp_yes": yes, "logp_no": no,
                       "accepted": yes > no}
            else:
                rec = {"index": len(result.candidates), "round": rnd, "text": "", "logp_yes": None, "logp_no": None,
                       "accepted": False}
            result.candidates.append(rec)
            (result.accepted if rec["accepted"] else result.rejected).append(rec)
            if rec["accepted"]:
                bar.update(1)
            if len(result.accepted) == n:
                break
        rnd += 1
        bar.set_postfix(rate=f"{result.acceptance_rate:.2f}")
    bar.close()
    return result


def write_jsonl(path: str | Path, records: Sequence[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
