"""A tiny random Llama with a real (byte-level BPE) tokenizer, saved as a Hugging Face directory.

Built offline in well under a second: the tokenizer is trained by ``tokenizers`` on a few
sentences, the model is a 2-layer random ``LlamaForCausalLM`` from a config.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CORPUS = [
    "Classify the sentiment of: a warm and funny film. Answer: positive",
    "Classify the sentiment of: dull, long and empty. Answer: negative",
    "the quick brown fox jumps over the lazy dog",
    "to be, or not to be, that is the question",
]


def tiny_tokenizer(chat_template: bool = True, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CORPUS * 4, trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama_lm(tok, seed: int = 0, layers: int = 2, hidden: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def save_tiny_lm_dir(path: Path, chat_template: bool = True, seed: int = 0) -> Path:
    """Write tokenizer + random tiny Llama to ``path`` (a model directory) and return it."""
    tok = tiny_tokenizer(chat_template)
    model = tiny_llama_lm(tok, seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path
