"""Token sequences for causal-LM fine-tuning: formatting, the loss mask, padding and packing.

Three row formats (chosen by the columns present, in this order):

* ``messages``: a chat, ``[{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]``,
  rendered with the tokenizer's chat template (which must exist);
* ``prompt`` + ``completion``: ``prompt`` tokens (with the tokenizer's BOS) then
  ``completion`` tokens and EOS;
* ``text`` (``--text-column``): the whole text and EOS.

Each example becomes ``ids`` and ``trained`` (per token: is predicting this token part of
the loss).  By default only completion / assistant tokens are trained
(``completion_only=False`` trains every token after the first).  The labels the
:class:`~lava_peft.train.Trainer` sees are *already shifted*: ``labels[t] = ids[t+1]`` if
token ``t+1`` is trained, else ``-100`` (so the plain token cross-entropy over
``logits[t]`` vs ``labels[t]`` is the next-token loss, and the last token of an example
never predicts anything).

Chat turns are tokenized piece by piece (the text up to the assistant turn with the
generation prompt, then the assistant turn), exactly as ``lava generate`` tokenizes a
prompt, so training and generation see the same token boundaries.

Packing (``pack=True``) puts several whole examples into one row of ``max_len`` tokens
(first-fit decreasing; an example is never split).  Each example's ``position_ids``
restart at 0 and no ``attention_mask`` is passed: transformers then attends only within
each example (block-diagonal causal mask, models built on ``transformers.masking_utils``
such as Llama, Mistral, Qwen2, GPT-2).  Labels never cross examples in any case, because
each example's last label is ``-100``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data.user_files import Table, UserDataError

__all__ = ["LmExample", "detect_format", "encode_examples", "to_padded", "to_packed", "shifted_labels",
           "render_chat", "IGNORE"]

IGNORE = -100


@dataclass
class LmExample:
    ids: list[int]
    trained: list[bool]
    prompt_ids: list[int]  # the tokens before the first trained token (for sample generations)
    reference: str  # the completion / first assistant turn / text, for reports
    place: str

    def __len__(self) -> int:
        return len(self.ids)


def detect_format(table: Table, text_column: str = "text") -> str:
    """``"messages"``, ``"prompt_completion"`` or ``"text"`` from the columns; error otherwise."""
    cols = set(table.columns)
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if text_column in cols:
        return "text"
    raise UserDataError(f"{table.source} has columns {sorted(map(str, cols))}; causal-LM data needs 'prompt' and "
                        f"'completion', a text column ({text_column!r}, see --text-column), or chat 'messages'")


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _text(row: dict, column: str, where: str) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value:
        raise UserDataError(f"{where}: {column!r} is {'missing or empty' if not value else type(value).__name__}; "
                            "every row needs a non-empty string there")
    return value


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template applied to ``messages`` as text (errors: no template, template failure)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserDataError("the tokenizer has no chat template, so 'messages' cannot be rendered; give the data as "
                            "prompt/completion or text, or add a chat_template to the model's tokenizer_config.json")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - jinja raises TemplateError and others
        raise UserDataError(f"the tokenizer's chat template failed on these messages ({exc})") from None


def _check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserDataError(f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}}")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserDataError(f"{where}: every message needs a string 'role' and a string 'content'; got {m!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserDataError(f"{where}: the conversation has no 'assistant' message, so there is nothing to learn")
    return messages


def _chat_pieces(tokenizer, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """The rendered chat cut into ``(text, is_assistant_turn)`` pieces whose concatenation is the full render."""
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    pieces, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(before) and full.startswith(upto) and len(before) >= done):
            raise UserDataError(f"{where}: the chat template does not render this conversation turn by turn (a "
                                "shorter conversation is not a prefix of the longer one), so the assistant tokens "
                                "cannot be located; use prompt/completion data instead")
        pieces += [(full[done:len(before)], False), (full[len(before):len(upto)], True)]
        done = len(upto)
    pieces.append((full[done:], False))
    return [(t, a) for t, a in pieces if t]


def _encode_row(tokenizer, row: dict, fmt: str, where: str, text_column: str, eos: list[int]):
    if fmt == "prompt_completion":
        prompt, completion = _text(row, "prompt", where), _text(row, "completion", where)
        p, c = _ids(tokenizer, prompt, True), _ids(tokenizer, completion, False) + eos
        return p + c, [False] * len(p) + [True] * len(c), completion
    if fmt == "text":
        text = _text(row, text_column, where)
        ids = _ids(tokenizer, text, True) + eos
        return ids, [True] * len(ids), text
    messages = _check_messages(row.get("messages"), where)
    ids, trained = [], []
    for text, assistant in _chat_pieces(tokenizer, messages, where):
        piece = _ids(tokenizer, text, False)
        ids += piece
        trained += [assistant] * len(piece)
    first_reply = next(m["content"] for m in messages if m["role"] == "assistant")
    return ids, trained, first_reply


def encode_examples(tokenizer, table: Table, max_len: int, completion_only: bool = True,
                    text_column: str = "text") -> tuple[list[LmExample], dict]:
    """Tokenize every row of ``table``; returns ``(examples, stats)``.  Examples longer than
    ``max_len`` are cut; an example left with no trained token is dropped (both counted in ``stats``)."""
    fmt = detect_format(table, text_column)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples, truncated, dropped = [], 0, 0
    for i, row in enumerate(table.rows):
        where = table.where(i)
        ids, trained, reference = _encode_row(tokenizer, row, fmt, where, text_column, eos)
        first = trained.index(True) if fmt != "text" else max(1, len(ids) // 3)  # where a sample generation starts
        if not completion_only:
            trained = [True] * len(ids)
        if len(ids) > max_len:
            ids, trained, truncated = ids[:max_len], trained[:max_len], truncated + 1
        if not any(trained[1:]):
            dropped += 1
            continue
        examples.append(LmExample(ids, trained, ids[: max(1, min(first, len(ids) - 1))], reference, where))
    if not examples:
        raise UserDataError(f"{table.source}: no example keeps a trained token within --max-len {max_len} tokens "
                            f"({dropped} rows dropped); raise --max-len")
    return examples, {"format": fmt, "rows": len(table), "examples": len(examples), "truncated": truncated,
                      "dropped": dropped, "trained_tokens": sum(sum(e.trained[1:]) for e in examples)}


def shifted_labels(ex: LmExample) -> list[int]:
    """``labels[t] = ids[t+1]`` where token ``t+1`` is trained, else -100; the last label is -100."""
    return [ex.ids[t + 1] if ex.trained[t + 1] else IGNORE for t in range(len(ex.ids) - 1)] + [IGNORE]


def to_padded(examples: list[LmExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the longest: ``input_ids``, ``attention_mask``, ``labels``."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(shifted_labels(e))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: example indices per row, every row's total length ``<= capacity``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def to_packed(examples: list[LmExample], pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """Whole examples packed into rows of ``max_len``: ``input_ids``, ``position_ids`` (restarting at 0
    for each example; the padding tail counts as one more sequence) and ``labels``; no attention mask."""
    rows = pack_rows([len(e) for e in examples], max_len)
    ids = torch.full((len(rows), max_len), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), max_len), dtype=torch.long)
    labels = torch.full((len(rows), max_len), IGNORE, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            e = examples[i]
            n = len(e)
            ids[r, start : start + n] = torch.tensor(e.ids)
            pos[r, start : start + n] = torch.arange(n)
            labels[r, start : start + n] = torch.tensor(shifted_labels(e))
            start += n
        pos[r, start:] = torch.arange(max_len - start)
    return {"input_ids": ids, "position_ids": pos, "labels": labels}
