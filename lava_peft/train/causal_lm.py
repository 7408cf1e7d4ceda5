"""Causal-LM fine-tuning on a user's data: the task, held-out perplexity and sample generations.

    task = build_causal_lm_task("my-llama/", "chats.jsonl", max_len=512)
    model = lp.adapt(task.model, lp.LoraConfig(r=8, target_modules="all-linear"))
    enable_memory_savers(model)
    Trainer(model, TrainingArguments(output_dir="runs/lm", metric="loss"), task.train, task.eval).train()
    perplexity(model, task.eval)

The labels in ``task.train`` / ``task.eval`` are already shifted (see :mod:`.lm_data`), so the
Trainer's default token cross-entropy is the next-token loss on completion / assistant tokens.
Perplexity is ``exp(Σ NLL / number of trained tokens)`` over the held-out examples, summed over
tokens (not averaged per batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.labelled import split_indices
from ..data.user_files import UserDataError, read_split_tables, read_table
from .data import trim_padding
from .lm_data import LmExample, encode_examples, to_packed, to_padded
from .tasks import Task

__all__ = ["CausalLmTask", "load_causal_lm", "load_lm_tokenizer", "load_lm_weights", "build_causal_lm_task", "enable_memory_savers", "perplexity",
           "sample_generations", "token_nll"]


@dataclass
class CausalLmTask(Task):
    """A :class:`Task` whose model is a causal LM (no new head; adapters on every linear layer by default)."""

    eval_examples: list[LmExample] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def heads(self) -> list[str]:
        return []

    @property
    def default_targets(self):
        return "all-linear"

    @property
    def run_info(self) -> dict:
        return {"user_data": self.stats}


def load_causal_lm(path: str):
    """``(model, tokenizer)`` of a Hugging Face causal-LM directory (tokenizer: pad token = EOS if it has none)."""
    tok = load_lm_tokenizer(path)
    return load_lm_weights(path), tok


def _check_lm_dir(path: str) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise UserDataError(f"--model {path}: not a Hugging Face model directory (no config.json); causal-LM training "
                            "needs the folder of a causal language model (config.json, weights, tokenizer files)")
    config = AutoConfig.from_pretrained(str(p))
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise UserDataError(f"--model {path}: a {type(config).__name__} has no causal-LM head in transformers; "
                            "give a causal language model (Llama, Mistral, Qwen2, GPT-2, ...)")
    return p


def load_lm_tokenizer(path: str):
    """The tokenizer of a causal-LM directory (checked first, so data errors come before loading weights)."""
    from transformers import AutoTokenizer

    p = _check_lm_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as exc:  # noqa: BLE001 - missing/corrupt tokenizer files raise several types
        raise UserDataError(f"--model {path}: its tokenizer cannot be loaded ({exc}); the folder needs tokenizer files") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise UserDataError(f"--model {path}: the tokenizer has neither a pad nor an EOS token; add one to it")
        tok.pad_token = tok.eos_token
    return tok


def load_lm_weights(path: str) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` without transformers' progress bar and load report."""
    import transformers
    from transformers import AutoModelForCausalLM

    p = _check_lm_dir(path)
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(str(p))
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _take(examples: list, limit: int | None, seed: int) -> list:
    if not limit or limit >= len(examples):
        return examples
    pick = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 1))[:limit]
    return [examples[i] for i in sorted(pick.tolist())]


def build_causal_lm_task(model: str, data: str, eval_data: str | None = None, *, max_len: int = 512,
                         pack: bool = False, completion_only: bool = True, eval_split: float = 0.1,
                         n_train: int | None = None, n_eval: int | None = None, seed: int = 0,
                         text_column: str = "text") -> CausalLmTask:
    """The causal LM at ``model`` and the tokenized ``data`` (held-out: ``eval_data``, a saved
    validation split, or a seeded ``eval_split`` fraction)."""
    table, heldout = read_split_tables(data)
    if eval_data:
        heldout = read_table(eval_data)
    tok = load_lm_tokenizer(model)
    examples, stats = encode_examples(tok, table, max_len, completion_only, text_column)
    if heldout is None:
        train_idx, eval_idx = split_indices(len(examples), eval_split, seed, table.source)
        train, held = [examples[i] for i in train_idx], [examples[i] for i in eval_idx]
    else:
        train = examples
        held, held_stats = encode_examples(tok, heldout, max_len, completion_only, text_column)
        stats["eval_file"] = held_stats
    train, held = _take(train, n_train, seed), _take(held, n_eval, seed)
    net = load_lm_weights(model)  # after every data check
    pad = tok.pad_token_id
    train_tensors = to_packed(train, pad, max_len) if pack else to_padded(train, pad)
    stats.update(data=str(data), eval_data=eval_data, packed=pack, completion_only=completion_only,
                 max_len=max_len, train_examples=len(train), eval_examples=len(held),
                 train_rows=len(train_tensors["input_ids"]))
    return CausalLmTask(net, "text", "causal_lm", train_tensors, to_padded(held, pad), tokenizer=tok,
                        model_path=str(Path(model).expanduser()), eval_examples=held, stats=stats)


def enable_memory_savers(model: nn.Module, gradient_checkpointing: bool = True) -> None:
    """Gradient checkpointing (non-reentrant: gradients reach adapters behind a frozen embedding)
    and no KV cache while training (a cache is useless there, and it would stop transformers from
    detecting packed sequences)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "config", None) is not None:
        base.config.use_cache = False
    if gradient_checkpointing and getattr(base, "supports_gradient_checkpointing", False):
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_checkpointing(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    flag = getattr(type(base), "is_activation_checkpointing", None)
    return bool(base.is_activation_checkpointing if flag is not None else base.is_gradient_checkpointing)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(Σ -log p(label), number of labelled tokens)`` for already-shifted labels (-100 ignored)."""
    labels = labels[:, : logits.shape[1]]
    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return total, int((labels != -100).sum())


@torch.no_grad()
def perplexity(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 16) -> dict:
    """``{"perplexity", "nll", "tokens"}``: token-weighted over the labelled tokens of ``data``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    n = len(data["input_ids"])
    for start in range(0, n, batch_size):
        batch = trim_padding({k: v[start : start + batch_size].to(device) for k, v in data.items()})
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits
        s, c = token_nll(logits, batch["labels"])
        total, count = total + float(s), count + c
    model.train(was_training)
    nll = total / max(count, 1)
    return {"perplexity": math.exp(min(nll, 700.0)), "nll": nll, "tokens": count}


@torch.no_grad()
def sample_generations(model: nn.Module, tokenizer, examples: list[LmExample], n: int = 4,
                       max_new_tokens: int = 32) -> list[dict]:
    """Greedy continuations of the first ``n`` held-out prompts: ``[{"prompt", "reference", "generated"}]``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache = getattr(base.config, "use_cache", True)
    base.config.use_cache = True
    out = []
    try:
        for ex in examples[:n]:
            ids = torch.tensor([ex.prompt_ids], device=device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            out.append({"place": ex.place, "prompt": tokenizer.decode(ex.prompt_ids, skip_special_tokens=True),
                        "reference": ex.reference,
                        "generated": tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)})
    finally:
        base.config.use_cache = cache
        model.train(was_training)
    return out
