"""The zoo's model recipes: architecture, tokenizer and pretraining schedule per named LM.

Families and pairs:

* ``llama-tiny`` -> ``llama-small``: two Llama-style models sharing the ``unigram``
  tokenizer (the within-family Trans-LoRA pair: a smaller source, a bigger target);
* ``gpt2-tiny``: a GPT-2-style model with its own byte-level BPE tokenizer (the
  cross-family target: another architecture *and* another vocabulary).

The default recipes are sized to pretrain in at most 10 minutes each on 2 CPU cores;
``*-big`` recipes (``lava zoo train --bigger``) are wider/deeper and train longer on a GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from ..errors import LavaError

__all__ = ["Recipe", "RECIPES", "get_recipe", "build_model"]


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a zoo model (its hash names the cache entry)."""

    name: str
    family: str  # "llama" | "gpt2"
    tokenizer: str  # "unigram" | "bytebpe" (see tokenizers.py)
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int = 0  # llama MLP width (gpt2 uses 4 * hidden)
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 1000
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def key(self) -> str:
        """Short hash of the recipe fields: a changed recipe never reuses an old cache entry."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def tokenizer_id(self) -> str:
        return f"{self.tokenizer}-{self.vocab_size}"


_SMALL = [
    Recipe("llama-tiny", "llama", "unigram", 4096, hidden=128, layers=3, heads=4, intermediate=352, batch_size=16, steps=600),
    Recipe("llama-small", "llama", "unigram", 4096, hidden=160, layers=4, heads=5, intermediate=432, batch_size=16, steps=250),
    Recipe("gpt2-tiny", "gpt2", "bytebpe", 4096, hidden=160, layers=4, heads=4, batch_size=16, steps=350),
]
_BIG = [
    Recipe("llama-tiny-big", "llama", "unigram", 8192, hidden=512, layers=8, heads=8, intermediate=1408,
           seq_len=256, batch_size=64, steps=6000, lr=1e-3, warmup=300),
    Recipe("llama-small-big", "llama", "unigram", 8192, hidden=768, layers=12, heads=12, intermediate=2048,
           seq_len=256, batch_size=64, steps=6000, lr=6e-4, warmup=300),
    Recipe("gpt2-tiny-big", "gpt2", "bytebpe", 8192, hidden=640, layers=8, heads=10,
           seq_len=256, batch_size=64, steps=6000, lr=1e-3, warmup=300),
]
RECIPES: dict[str, Recipe] = {r.name: r for r in _SMALL + _BIG}
SMALL_RECIPES = tuple(r.name for r in _SMALL)
BIG_RECIPES = tuple(r.name for r in _BIG)


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise LavaError(f"unknown zoo model {name!r}; the zoo has {sorted(RECIPES)}") from None


def build_model(recipe: Recipe, tokenizer):
    """A randomly initialised HF causal LM for ``recipe`` (ids of ``tokenizer``'s special tokens set)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    vocab = len(tokenizer)
    if recipe.family == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
            num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
            num_key_value_heads=recipe.heads, max_position_embeddings=2 * recipe.seq_len,
            tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        return LlamaForCausalLM(config)
    if recipe.family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=recipe.hidden, n_layer=recipe.layers, n_head=recipe.heads,
            n_positions=2 * recipe.seq_len, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        return GPT2LMHeadModel(config)
    raise LavaError(f"recipe {recipe.name!r} has unknown family {recipe.family!r}")
