"""Pretrain a zoo LM on the packaged corpus, cache it, and load it back.

Cache layout (``zoo_dir()`` = ``$LAVA_ZOO_DIR`` or ``$XDG_CACHE_HOME/lava-peft/zoo`` or
``~/.cache/lava-peft/zoo``)::

    tokenizers/<kind>-<vocab>/      HF tokenizer files (shared by every model of that scheme)
    <name>/                         HF model (safetensors) + tokenizer + zoo.json

``zoo.json`` holds the recipe, its hash, the held-out perplexity, steps and wall time.  A
cache entry whose recipe hash differs is rebuilt.  Entries are written to a temporary
folder and renamed, so an interrupted run never leaves a half model behind.

Training: documents joined by EOS and cut into ``seq_len`` blocks; AdamW, linear warmup
then cosine decay; loss = mean next-token cross entropy.  Held-out perplexity
``exp(mean NLL)`` over the held-out blocks (see ``corpus.split_documents``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import LavaError
from ..io import atomic_write_json, read_json
from .corpus import packaged_documents, split_documents
from .recipes import Recipe, build_model, get_recipe
from .tokenizers import train_tokenizer

__all__ = ["zoo_dir", "load_zoo_model", "pretrain", "cached_info", "ZooModelMissingError"]


class ZooModelMissingError(LavaError, FileNotFoundError):
    """A zoo model is not in the cache and training it was not allowed."""


def zoo_dir() -> Path:
    if os.environ.get("LAVA_ZOO_DIR"):
        return Path(os.environ["LAVA_ZOO_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lava-peft" / "zoo"


def _atomic_dir(final: Path, fill) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        fill(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def get_tokenizer(recipe: Recipe, train_texts: list[str] | None = None):
    """The recipe's tokenizer from the cache, trained (on the corpus' train split) if missing."""
    from transformers import PreTrainedTokenizerFast

    path = zoo_dir() / "tokenizers" / recipe.tokenizer_id()
    if not (path / "tokenizer.json").exists():
        texts = train_texts if train_texts is not None else split_documents(packaged_documents())[0]
        tok = train_tokenizer(recipe.tokenizer, texts, recipe.vocab_size)
        _atomic_dir(path, lambda d: tok.save_pretrained(str(d)))
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def _blocks(tokenizer, texts: list[str], seq_len: int):
    import torch

    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def perplexity(model, blocks, batch_size: int = 32) -> float:
    """``exp`` of the mean next-token NLL of ``model`` over ``blocks`` (an ``(N, T)`` id tensor)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            b = blocks[i : i + batch_size]
            logits = model(input_ids=b).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), b[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += b[:, 1:].numel()
    return math.exp(total / max(count, 1))


def cached_info(name: str) -> dict | None:
    """``zoo.json`` of a cached model whose recipe is current, else ``None``."""
    recipe = get_recipe(name)
    meta = zoo_dir() / name / "zoo.json"
    if not meta.exists():
        return None
    info = read_json(meta)
    return info if info.get("recipe_key") == recipe.key() else None


def pretrain(name: str, device: str = "cpu", progress: bool = True, force: bool = False,
             max_minutes: float | None = None) -> dict:
    """Pretrain zoo model ``name`` (unless cached and ``force`` is false); returns its ``zoo.json``.

    ``max_minutes`` caps the wall time: training stops after the step that crosses it
    (``zoo.json`` then records ``steps_done < recipe.steps`` and ``time_limited``).  The
    schedule follows ``progress = max(step / steps, elapsed / budget)``: linear warmup,
    then cosine decay to 10 % of the peak, so a time-limited run still ends at a low rate.
    """
    import torch
    from tqdm.auto import tqdm

    recipe = get_recipe(name)
    if not force and (info := cached_info(name)) is not None:
        return info
    t0 = time.time()
    train_texts, held_texts = split_documents(packaged_documents())
    tokenizer = get_tokenizer(recipe, train_texts)
    train, held = _blocks(tokenizer, train_texts, recipe.seq_len), _blocks(tokenizer, held_texts, recipe.seq_len)
    model = build_model(recipe, tokenizer).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.95))
    budget = None if max_minutes is None else 60.0 * max_minutes
    t_train = time.time()

    def lr_factor(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        if budget is not None:
            frac = max(frac, (time.time() - t_train) / budget)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    gen = torch.Generator().manual_seed(recipe.seed)
    model.train()
    bar = tqdm(range(recipe.steps), desc=f"pretrain {name}", disable=not progress)
    steps_done = 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = recipe.lr * lr_factor(step)
        idx = torch.randint(len(train), (recipe.batch_size,), generator=gen)
        batch = train[idx].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps_done = step + 1
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if budget is not None and time.time() - t_train > budget:
            break
    bar.close()
    ppl = perplexity(model, held.to(device))
    model = model.cpu()
    info = {
        "name": name, "recipe": recipe.__dict__, "recipe_key": recipe.key(), "family": recipe.family,
        "tokenizer": recipe.tokenizer_id(), "held_out_perplexity": round(ppl, 3),
        "held_out_tokens": int(held[:, 1:].numel()), "steps_done": steps_done,
        "time_limited": steps_done < recipe.steps, "tokens_seen": steps_done * recipe.batch_size * recipe.seq_len, "train_tokens": int(train.numel()),
        "parameters": sum(p.numel() for p in model.parameters()), "wall_seconds": round(time.time() - t0, 1),
        "device": device, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }

    def fill(d: Path) -> None:
        model.save_pretrained(str(d), safe_serialization=True)
        tokenizer.save_pretrained(str(d))
        atomic_write_json(d / "zoo.json", info)

    _atomic_dir(zoo_dir() / name, fill)
    return info


def load_zoo_model(name: str, train_if_missing: bool = False, progress: bool = True):
    """``(model, tokenizer)`` of a cached zoo LM (pretrained first when ``train_if_missing``)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if cached_info(name) is None:
        if not train_if_missing:
            raise ZooModelMissingError(
                f"zoo model {name!r} is not in {zoo_dir()}; train it first with `lava zoo train {name}` "
                "(about 10 minutes on 2 CPU cores)"
            )
        pretrain(name, progress=progress)
    path = zoo_dir() / name
    model = AutoModelForCausalLM.from_pretrained(str(path))
    model.eval()
    return model, PreTrainedTokenizerFast.from_pretrained(str(path))


def describe(name: str) -> str:
    info = cached_info(name)
    if info is None:
        return f"{name:18s} not trained"
    return (f"{name:18s} {info['family']:6s} {info['parameters'] / 1e6:5.2f}M params  tokenizer {info['tokenizer']:13s} "
            f"held-out ppl {info['held_out_perplexity']:8.2f}  {info.get('steps_done', '?')} steps in {info['wall_seconds']:.0f}s")
