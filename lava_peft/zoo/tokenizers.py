"""Tokenizers of the zoo LMs, trained with the ``tokenizers`` library on the packaged corpus.

Two deliberately different schemes, so that a Llama-style and a GPT-2-style zoo model do
*not* share a vocabulary (the cross-family case of Trans-LoRA):

* ``unigram``: a SentencePiece-style Unigram model over Metaspace pieces (``▁word``),
  special tokens ``<unk> <s> </s> <pad>`` (as Llama tokenizers have);
* ``bytebpe``: a GPT-2-style byte-level BPE, special tokens ``<|endoftext|> <pad>``.

Both keep ``\\n`` as a symbol (prompts are line based) and return a
``PreTrainedTokenizerFast`` with an EOS and a pad token.  No post-processor adds tokens:
callers place BOS/EOS themselves.
"""

from __future__ import annotations

from ..errors import LavaError

__all__ = ["TOKENIZER_KINDS", "train_tokenizer"]

TOKENIZER_KINDS = ("unigram", "bytebpe")


def train_tokenizer(kind: str, texts: list[str], vocab_size: int):
    """Train a ``kind`` tokenizer with ``vocab_size`` entries on ``texts``; returns a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "unigram":
        specials = ["<unk>", "<s>", "</s>", "<pad>"]
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
            initial_alphabet=["\n"], max_piece_length=12, show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", pad_token="<pad>")
    if kind == "bytebpe":
        specials = ["<|endoftext|>", "<pad>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                       unk_token=None, pad_token="<pad>")
    raise LavaError(f"unknown tokenizer kind {kind!r}; choose one of {list(TOKENIZER_KINDS)}")
