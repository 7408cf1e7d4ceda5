"""``lava generate``: text from a causal LM with one or several adapters.

    lava generate --adapter runs/lm --prompt "Classify the sentiment of: a fine film. Answer:"
    lava generate --model my-llama/ --adapter sql=runs/sql --adapter chat=runs/chat \\
                  --prompts prompts.jsonl --max-new-tokens 64 --temperature 0.7 --top-p 0.9

Adapters: ``--adapter [NAME=]PATH`` (repeat it), ``PATH`` = a ``lava train`` run directory (its
``best/``, else ``adapter/``) or an adapter directory.  The base model is ``--model`` or the
one recorded in the first run's ``run.json``.

Which adapter serves which prompt (``--use``): one name for every prompt, a comma-separated
name per prompt, ``all`` (every prompt with every adapter; the default with several
adapters) or ``base`` (no adapter).  A ``.jsonl`` prompt file may name one per line
(``{"prompt": ..., "adapter": "sql"}``).  Rows with different adapters are generated in one
batch through the adapted model's mixed-batch path (``generate(adapter_names=...)``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LavaConfigError

__all__ = ["add_arguments", "run", "register", "parse_adapter_specs", "read_prompts", "assign_adapters"]

BASE = "base"


def add_arguments(p) -> None:
    p.add_argument("--model", help="base causal-LM directory (default: the model recorded in the first --adapter run)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="adapter to load: a `lava train` run directory or an adapter directory; repeat for several "
                        "(names default to default, adapter2, ...)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeat for several)")
    p.add_argument("--prompts", metavar="FILE", help="prompts file: .txt (one per line) or .jsonl (objects with "
                   "'prompt' or chat 'messages', optionally 'adapter')")
    p.add_argument("--use", metavar="NAMES", help="adapter per prompt: one name, one name per prompt (comma-"
                   "separated), 'all' (each prompt with every adapter; default with several) or 'base'")
    p.add_argument("--chat", action="store_true", help="wrap each plain prompt as a user message in the tokenizer's "
                   "chat template (messages in a .jsonl file always are)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--top-k", dest="top_k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    p.add_argument("--repetition-penalty", dest="repetition_penalty", type=float, default=1.0)
    p.add_argument("--num-return-sequences", dest="num_return_sequences", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="rows per generate call (default 8)")
    p.add_argument("--out", metavar="FILE", help="also write the results as JSON Lines to FILE")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def register(register_command) -> None:
    register_command("generate", "generate text from a causal LM with one or several adapters", add_arguments, run,
                     description=__doc__)


# ----------------------------------------------------------------------------- inputs
def _adapter_dir(path: str) -> tuple[Path, dict]:
    """(adapter directory, the run's cli options or {})."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LavaConfigError(f"--adapter {path}: does not exist; give a `lava train` run directory or an adapter directory")
    run = p if (p / "run.json").is_file() else (p.parent if (p.parent / "run.json").is_file() else None)
    if (p / "run.json").is_file():
        p = p / "best" if (p / "best" / "adapter_config.json").is_file() else p / "adapter"
    if not (p / "adapter_config.json").is_file():
        raise LavaConfigError(f"--adapter {path}: no adapter_config.json in {p}; give a run directory of an adapter "
                              "method or an adapter directory written by save_pretrained()")
    info = json.loads((run / "run.json").read_text()).get("cli", {}) if run else {}
    return p, info


def parse_adapter_specs(specs: list[str]) -> dict[str, tuple[Path, dict]]:
    """``{name: (adapter dir, run options)}`` from ``[NAME=]PATH`` strings, in the given order."""
    out: dict[str, tuple[Path, dict]] = {}
    for i, spec in enumerate(specs):
        name, sep, path = spec.partition("=")
        if not sep or not name.isidentifier():  # a bare path (which may itself contain '=')
            name, path = ("default" if i == 0 else f"adapter{i + 1}"), spec
        if name == BASE or name in out:
            raise LavaConfigError(f"--adapter {spec}: the name {name!r} is {'reserved' if name == BASE else 'used twice'}; "
                                  "give each adapter its own NAME=PATH")
        out[name] = _adapter_dir(path)
    return out


def read_prompts(texts: list[str], file: str | None) -> list[dict]:
    """``[{"prompt": str} or {"messages": [...]}, optional "adapter"]`` from ``--prompt`` and ``--prompts``."""
    items = [{"prompt": t} for t in texts]
    if file:
        p = Path(file).expanduser()
        if not p.is_file():
            raise LavaConfigError(f"--prompts {file}: no such file")
        lines = p.read_text(encoding="utf-8").splitlines()
        if p.suffix.lower() == ".jsonl":
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LavaConfigError(f"--prompts {file}, line {n}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)):
                    raise LavaConfigError(f"--prompts {file}, line {n}: needs a 'prompt' string or a 'messages' list")
                items.append({k: row[k] for k in ("prompt", "messages", "adapter") if k in row})
        else:
            items += [{"prompt": line} for line in lines if line.strip()]
    if not items:
        raise LavaConfigError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    return items


def assign_adapters(items: list[dict], names: list[str], use: str | None) -> list[tuple[int, str]]:
    """``[(prompt index, adapter name or 'base')]``: the rows to generate."""
    if use is None:
        use = "all" if len(names) > 1 else (names[0] if names else BASE)
    known = set(names) | {BASE}
    if use == "all":
        choice = [None] * len(items)
    else:
        parts = [u.strip() for u in use.split(",")]
        if len(parts) not in (1, len(items)):
            raise LavaConfigError(f"--use gives {len(parts)} names for {len(items)} prompts; give one name, one per "
                                  "prompt, or 'all'")
        choice = parts * len(items) if len(parts) == 1 else parts
    rows = []
    for i, item in enumerate(items):
        picked = item.get("adapter", choice[i])
        for name in ([picked] if picked is not None else names or [BASE]):
            if name not in known:
                raise LavaConfigError(f"adapter {name!r} (prompt {i + 1}) is not loaded; loaded: {sorted(known)}")
            rows.append((i, name))
    return rows


# ----------------------------------------------------------------------------- generation
def _prompt_ids(tok, item: dict, chat: bool) -> list[int]:
    from ..train.lm_data import render_chat

    if "messages" in item or chat:
        messages = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
        return list(tok(render_chat(tok, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"])
    return list(tok(item["prompt"], add_special_tokens=True)["input_ids"])


def _check_sampling(ns) -> None:
    if ns.max_new_tokens < 1 or ns.batch_size < 1 or ns.num_return_sequences < 1:
        raise LavaConfigError("--max-new-tokens, --batch-size and --num-return-sequences must be >= 1")
    if ns.temperature < 0 or not 0 < ns.top_p <= 1 or ns.top_k < 0:
        raise LavaConfigError("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")
    if ns.num_return_sequences > 1 and ns.temperature == 0:
        raise LavaConfigError("--num-return-sequences > 1 needs sampling: set --temperature > 0")


def _sampling(ns, tok) -> dict:
    _check_sampling(ns)
    kw = dict(max_new_tokens=ns.max_new_tokens, repetition_penalty=ns.repetition_penalty,
              num_return_sequences=ns.num_return_sequences, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if ns.temperature > 0:
        kw.update(do_sample=True, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k or None)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def _generate_batch(model, batch: list[tuple[list[int], str]], pad_id: int, kw: dict) -> list[list[int]]:
    """Left-padded batch → new tokens per returned sequence (rows × num_return_sequences)."""
    import torch

    from ..layers import BASE_NAME
    from ..model import AdaptedModel

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids, _ in batch])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in batch])
    names = [BASE_NAME if name == BASE else name for _, name in batch]
    with torch.no_grad():
        if isinstance(model, AdaptedModel) and len(set(names)) > 1:
            out = model.generate(input_ids=input_ids, attention_mask=mask, adapter_names=names, **kw)
        elif isinstance(model, AdaptedModel) and names[0] == BASE_NAME:
            with model.disable_adapter():
                out = model.generate(input_ids=input_ids, attention_mask=mask, **kw)
        else:
            if isinstance(model, AdaptedModel):
                model.set_adapter(names[0])
            out = model.generate(input_ids=input_ids, attention_mask=mask, **kw)
    return [row[width:].tolist() for row in out]


def generate_rows(model, tok, items: list[dict], rows: list[tuple[int, str]], ns) -> list[dict]:
    """Generate every ``(prompt index, adapter)`` row; returns the result records."""
    import torch
    from tqdm.auto import tqdm

    kw = _sampling(ns, tok)
    torch.manual_seed(ns.seed)
    prompt_ids = [_prompt_ids(tok, item, ns.chat) for item in items]
    results = []
    bar = tqdm(total=len(rows), desc="generate", unit="prompt", leave=False, disable=len(rows) <= ns.batch_size)
    for start in range(0, len(rows), ns.batch_size):
        chunk = rows[start : start + ns.batch_size]
        outs = _generate_batch(model, [(prompt_ids[i], name) for i, name in chunk], tok.pad_token_id, kw)
        k = ns.num_return_sequences
        for j, (i, name) in enumerate(chunk):
            for s in range(k):
                item = items[i]
                results.append({"prompt": item.get("prompt", item.get("messages")), "adapter": name,
                                "sample": s, "completion": tok.decode(outs[j * k + s], skip_special_tokens=True)})
        bar.update(len(chunk))
    bar.close()
    return results


def load_model_and_adapters(model_dir: str | None, adapters: dict[str, tuple[Path, dict]]):
    """``(model, tokenizer)``: the base causal LM with every adapter loaded (unmerged, inactive but the first)."""
    from ..model import AdaptedModel
    from ..train.causal_lm import load_causal_lm

    if model_dir is None:
        recorded = [info.get("model") for _, info in adapters.values() if info.get("model")]
        if not recorded:
            raise LavaConfigError("no base model: pass --model DIR (the adapter is not inside a `lava train` run)")
        model_dir = recorded[0]
    base, tok = load_causal_lm(model_dir)
    base.eval()
    if not adapters:
        return base, tok
    model = AdaptedModel(base)
    for name, (path, _) in adapters.items():
        model.load_adapter(str(path), name)
    model.set_adapter(next(iter(adapters)))
    return model.eval(), tok


def run(ns) -> int:
    from ..io import atomic_write_bytes

    adapters = parse_adapter_specs(ns.adapter)
    items = read_prompts(ns.prompt, ns.prompts)
    rows = assign_adapters(items, list(adapters), ns.use)
    _check_sampling(ns)  # every option error before the model is loaded
    model, tok = load_model_and_adapters(ns.model, adapters)
    results = generate_rows(model, tok, items, rows, ns)
    if ns.out:
        atomic_write_bytes(ns.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results).encode())
    if ns.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    for r in results:
        prompt = r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"], ensure_ascii=False)
        tag = f"[{r['adapter']}" + (f" #{r['sample']}]" if ns.num_return_sequences > 1 else "]")
        print(f"{tag} {prompt}\n  -> {r['completion']}")
    if ns.out:
        print(f"wrote {len(results)} results to {ns.out}")
    return 0
