"""``lava train`` on your own data: ``--data my.csv`` (classification) and ``--task causal-lm``.

``cli.py`` wires this in with two small hooks (module import is cheap: no torch here):

    TRAIN_OPTIONS.update(USER_TRAIN_OPTIONS); FLAG_OPTIONS.update(USER_FLAG_OPTIONS)
    ...  # in cmd_train, after the seed is set:
    if wants_user_data(opts):
        return train_on_user_data(opts, build_model_for)

``build_model_for(opts, task)`` is the CLI's own ``--method`` → adapter code, passed in so
that every method (lava, lora, shira, sft, dylora, lowbit, mosa, full) works unchanged.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Callable

from ..errors import LavaConfigError

__all__ = ["USER_TRAIN_OPTIONS", "USER_FLAG_OPTIONS", "TASKS", "wants_user_data", "train_on_user_data",
           "add_user_data_arguments", "build_task_from_user_data"]

TASKS = ("classify", "causal-lm")
PACKAGED_DATA = ("rotten_tomatoes", "fashion_mnist", "digits")

# name -> (default, type, help), merged into cli.TRAIN_OPTIONS (so config files accept them too).
USER_TRAIN_OPTIONS = {
    "data": ("rotten_tomatoes", str, "data: a packaged set (rotten_tomatoes, fashion_mnist, digits), or your own: a "
                                     ".csv/.tsv/.jsonl/.json/.parquet file, a folder saved by datasets' save_to_disk, "
                                     "or an image folder with one sub-folder per class"),
    "task": ("classify", str, "classify (a classifier with a new head) | causal-lm (fine-tune a causal LM given by "
                              "--model DIR on prompt/completion, text or chat 'messages' data) | rank-count, rank-count-class, "
                              "rank-scale, rank-rotation, rank-brightness (the ranking adapter; same as `lava rank`)"),
    "eval_data": (None, str, "held-out data in the same format as --data (default: a seeded --eval-split of --data, "
                             "or the validation/test split of a saved DatasetDict)"),
    "eval_split": (0.1, float, "fraction of --data held out for evaluation when --eval-data is not given"),
    "text_column": ("text", str, "column holding the text (classification; causal-lm 'text' data)"),
    "label_column": ("label", str, "column holding the label (strings or integers; the mapping is saved in run.json)"),
    "text_pair_column": (None, str, "optional second text column (sentence pairs, e.g. premise/hypothesis)"),
    "n_samples": (4, int, "causal-lm: held-out prompts to generate from before and after training (samples.jsonl)"),
}
USER_FLAG_OPTIONS = {
    "pack": "causal-lm: pack several short examples into each --max-len row (attention and labels stay per example)",
    "train_on_prompt": "causal-lm: compute the loss on every token, not only on completion / assistant tokens",
    "no_gradient_checkpointing": "causal-lm: keep activations instead of recomputing them (faster, more memory)",
}


def add_user_data_arguments(parser) -> None:
    """Add the user-data options to an ``argparse`` parser that does not go through ``TRAIN_OPTIONS``."""
    import argparse

    for name, (default, typ, help_) in USER_TRAIN_OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=argparse.SUPPRESS,
                            help=help_ + ("" if default is None else f" (default: {default})"), metavar=name.upper())
    for name, help_ in USER_FLAG_OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", default=argparse.SUPPRESS,
                            help=help_)


def _defaults(opts: dict) -> dict:
    out = {name: default for name, (default, _, _) in USER_TRAIN_OPTIONS.items()}
    out.update({name: False for name in USER_FLAG_OPTIONS})
    out.update({k: v for k, v in opts.items() if v is not None or k not in out})
    return out


def wants_user_data(opts: dict) -> bool:
    """``--task causal-lm``, or ``--data`` naming a file/folder rather than a packaged data set."""
    opts = _defaults(opts)
    if opts["task"] not in TASKS:
        raise LavaConfigError(f"--task must be one of {TASKS}; got {opts['task']!r}")
    if opts["task"] == "causal-lm":
        return True
    if opts["data"] in PACKAGED_DATA:
        return False
    if not Path(opts["data"]).exists():
        raise LavaConfigError(f"unknown data set {opts['data']!r}: that path does not exist, and it is not a packaged "
                              f"data set ({', '.join(PACKAGED_DATA)}); check the path")
    return True


def build_task_from_user_data(opts: dict):
    """The task ``opts`` describe: a :class:`~lava_peft.train.user_tasks.UserTask` (classification)
    or a :class:`~lava_peft.train.causal_lm.CausalLmTask`."""
    opts = _defaults(opts)
    n_train, n_eval = opts.get("n_train") or None, opts.get("n_eval") or None
    if opts["task"] == "causal-lm":
        from ..train.causal_lm import build_causal_lm_task

        if opts["data"] in PACKAGED_DATA:
            raise LavaConfigError(f"--task causal-lm needs your own data file (--data my.jsonl with prompt/completion, "
                                  f"text or messages); {opts['data']!r} is a classification set")
        if opts.get("method") == "head":
            raise LavaConfigError("--method head trains a new classifier head; a causal LM has none. Use an adapter "
                                  "method (lava, lora, ...) or full")
        return build_causal_lm_task(opts["model"], opts["data"], opts["eval_data"], max_len=opts.get("max_len", 512),
                                    pack=opts["pack"], completion_only=not opts["train_on_prompt"],
                                    eval_split=opts["eval_split"], n_train=n_train, n_eval=n_eval,
                                    seed=opts.get("seed", 0), text_column=opts["text_column"])
    from ..train.user_tasks import build_user_task

    return build_user_task(opts["model"], opts["data"], opts["eval_data"], text_column=opts["text_column"],
                           label_column=opts["label_column"], pair_column=opts["text_pair_column"],
                           eval_split=opts["eval_split"], n_train=n_train, n_eval=n_eval, seed=opts.get("seed", 0),
                           max_len=opts.get("max_len", 64), image_size=opts.get("image_size", 64))


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from ..io import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def train_on_user_data(opts: dict, build_model_for: Callable) -> int:
    """Everything ``lava train`` does after the seed is set, for user data (classification or causal LM)."""
    from ..io import atomic_write_json
    from ..train import Trainer, TrainingArguments, plot_metrics

    opts = _defaults(opts)
    causal = opts["task"] == "causal-lm"
    print(f"lava train: loading {opts['model']} and {opts['data']} ...", flush=True)
    task = build_task_from_user_data(opts)
    stats = task.run_info["user_data"]
    if causal:
        print(f"lava train: {stats['format']} data, {stats['train_examples']} training examples in "
              f"{stats['train_rows']} rows{' (packed)' if stats['packed'] else ''}, {stats['eval_examples']} held out; "
              f"{stats['trained_tokens']:,d} trained tokens", flush=True)
        if stats["truncated"] or stats["dropped"]:
            print(f"lava train: warning: {stats['truncated']} example(s) were longer than --max-len {opts['max_len']} "
                  f"tokens and were cut, {stats['dropped']} lost every trained token and were dropped; raise --max-len",
                  flush=True)
    else:
        print(f"lava train: {len(task.label_map.names)} classes {list(task.label_map.names)[:10]}, "
              f"{stats['train_rows']} training / {stats['eval_rows']} held-out examples ({stats['held_out']})", flush=True)
    model = build_model_for(opts, task)
    before = samples_before = None
    if causal:
        from ..train.causal_lm import enable_memory_savers, perplexity, sample_generations

        before = perplexity(model, task.eval)
        samples_before = sample_generations(model, task.tokenizer, task.eval_examples, opts["n_samples"])
        enable_memory_savers(model, gradient_checkpointing=not opts["no_gradient_checkpointing"])
    args = TrainingArguments(
        output_dir=opts["out"], epochs=opts["epochs"], max_steps=opts["max_steps"], batch_size=opts["batch_size"],
        grad_accum_steps=opts["grad_accum"], lr=opts["lr"], head_lr=opts["head_lr"], weight_decay=opts["weight_decay"],
        schedule=opts["schedule"], warmup_ratio=opts["warmup_ratio"], eval_every=opts["eval_every"],
        mixed_precision=opts["mixed_precision"], seed=opts["seed"], overwrite=opts["overwrite"],
        resume_from="auto" if opts["resume"] else None, progress=not opts["no_progress"],
        group_by_length=not (causal and opts["pack"]), eval_at_start=True, metric="loss" if causal else "accuracy",
    )
    cli_info = {k: v for k, v in opts.items() if k not in ("overwrite", "resume", "no_progress")}
    trainer = Trainer(model, args, task.train, task.eval, run_info={"cli": cli_info, **task.run_info})
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    out = Path(opts["out"])
    png = plot_metrics(opts["out"], title=f"{opts['method']} on {Path(opts['model']).name} / {Path(opts['data']).name}")
    adapter = out / ("best" if (out / "best").exists() else "adapter")
    print(f"plot:      {png}")
    if causal:
        after = perplexity(model, task.eval)
        samples_after = sample_generations(model, task.tokenizer, task.eval_examples, opts["n_samples"])
        rows = [dict(s, before=b["generated"], after=s.pop("generated")) for s, b in zip(samples_after, samples_before)]
        _write_jsonl(out / "samples.jsonl", rows)
        report = {"perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
                  "eval_tokens": after["tokens"], "train_seconds_with_eval": seconds,
                  "peak_memory_mb": _peak_memory_mb(), "data": stats}
        atomic_write_json(out / "lm_eval.json", report)
        print(f"held-out perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f} on {after['tokens']} "
              f"tokens ({out / 'lm_eval.json'}); sample generations: {out / 'samples.jsonl'}")
        print(f"generate:  lava generate --adapter {out} --prompt '...'")
    else:
        print(f"labels:    {list(task.label_map.names)} (saved in {out / 'run.json'})")
    print(f"inspect:   lava inspect {adapter}")
    return 0
