"""LAVA's evidence (issue 18): ablations and equal-budget quality runs, paired by seed.

    # the MobileNetV2 ablation (item 0), reduced size, 3 seeds
    python -m benchmarks.quality.evidence --suite mobilenet --variants lora,lava,lava_l0,lava_initlora,lava_urand,lava_fold1x1,lava_dwlora,lava_lrP
    # lr chosen per method on a validation split carved from the training examples, then the seeds
    python -m benchmarks.quality.evidence --suite vgg --variants lora,lava,lava_tucker --select-lr --lr-grid 1e-3,3e-3,1e-2
    # full size (unmeasured here): --n-train 4000 --n-eval 2000 --epochs 3 --seeds 0,1,2,3,4
    python -m benchmarks.quality.evidence --report         # rewrite evidence.md from the records

Suites (real pretrained models, real data, offline): ``mobilenet`` (ImageNet MobileNetV2, every
conv incl. depthwise, Fashion-MNIST 64 px), ``vgg`` (CRAFT VGG16-BN, its 12 dense 3×3 convs,
Fashion-MNIST 64 px), ``text_qv`` / ``text_all`` (MiniLM-L6 on Rotten Tomatoes split by
movie; query/value or every linear layer).  Variants: :mod:`.evidence_variants`.

Training: AdamW (no weight decay), 6 % linear warm-up then cosine, BatchNorm statistics
frozen, ``loss = CE + model.regularization_loss()``; the adapters at the adapter lr, the new
head at the suite's head lr (fixed).  The data subset is the same for every run (seed 0);
the run seed sets the adapter/head init and the batch order, so runs with the same seed are
paired.  ``--select-lr``: the training examples are split once (seed 0) into 80 % fit / 20 %
validation; each lr of the grid trains once (seed 0) on the fit part and is scored on the
validation part; the best lr (ties: the smaller) then trains every seed on all training
examples and is scored on the held-out split, which never enters the choice.

Each run is appended to ``<out>/evidence.runs.jsonl`` (a re-run skips recorded runs), and
``<out>/evidence.md`` is rewritten after each run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lava_peft.train import set_seed
from lava_peft.train.schedule import param_groups
from lava_peft.train.tasks import build_task
from lava_peft.train.trainer import default_forward

from .common import lr_factor, run_meta
from .evidence_report import write_report
from .evidence_variants import VARIANTS


@dataclass
class Suite:
    model: str
    data: str
    targets: object
    n_train: int
    n_eval: int
    epochs: int
    batch_size: int
    lr: float
    head_lr: float
    image_size: int = 64
    max_len: int = 64


SUITES = {
    "mobilenet": Suite("mobilenet_v2", "fashion_mnist", "all-conv", 800, 500, 2, 32, 3e-3, 3e-3),
    "vgg": Suite("craft_vgg16_bn", "fashion_mnist", "all-conv", 400, 400, 2, 32, 3e-3, 3e-3),
    "text_qv": Suite("minilm", "rotten_tomatoes", ["query", "value"], 1000, 600, 1, 16, 2e-3, 2e-3),
    "text_all": Suite("minilm", "rotten_tomatoes", "all-linear", 1000, 600, 1, 16, 2e-3, 2e-3),
}


def _subset(data: dict, idx: torch.Tensor) -> dict:
    return {k: v[idx] for k, v in data.items()}


def _freeze_bn_train(model) -> None:
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.no_grad()
def _accuracy(model, data: dict, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    n = len(data["labels"])
    for i in range(0, n, batch_size):
        batch = {k: v[i:i + batch_size] for k, v in data.items()}
        correct += (default_forward(model, batch).argmax(-1) == batch["labels"]).sum().item()
    return correct / n


def train_run(model, info: dict, train: dict, s: Suite, lr: float, seed: int) -> dict:
    """Train ``model`` in place; returns the per-step losses, the orth term and timings."""
    groups = param_groups(model)
    scale = info.get("lr_scale", {})
    torch_groups = [{"params": [p for _, p in groups["head"]], "lr": s.head_lr}] if groups["head"] else []
    adapter = groups["adapter"] + groups["other"]
    by_scale: dict[float, list] = {}
    by_param = info.get("lr_scale_params", {})
    for name, p in adapter:
        f = by_param.get(id(p), next((v for k, v in scale.items() if k in name), 1.0))
        by_scale.setdefault(f, []).append(p)
    torch_groups += [{"params": ps, "lr": lr * f} for f, ps in by_scale.items()]
    opt = torch.optim.AdamW(torch_groups, lr=lr, weight_decay=0.0)
    n = len(train["labels"])
    total = math.ceil(n / s.batch_size) * s.epochs
    warmup = max(1, int(0.06 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, total, warmup))
    gen = torch.Generator().manual_seed(seed)
    losses, regs = [], []
    start = time.perf_counter()
    for _ in range(s.epochs):
        _freeze_bn_train(model)
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, s.batch_size):
            batch = _subset(train, order[i:i + s.batch_size])
            loss = F.cross_entropy(default_forward(model, batch).float(), batch["labels"])
            reg = model.regularization_loss()
            opt.zero_grad(set_to_none=True)
            (loss + reg).backward()
            opt.step()
            sched.step()
            losses.append(round(loss.item(), 5))
            regs.append(round(float(reg.detach()) if torch.is_tensor(reg) else float(reg), 6))
    return {"losses": losses, "reg": regs, "train_seconds": time.perf_counter() - start, "steps": total}


def run_one(suite: str, variant: str, seed: int, lr: float, select: bool = False) -> dict:
    s = SUITES[suite]
    set_seed(seed)
    task = build_task(s.model, s.data, n_train=s.n_train, n_eval=s.n_eval, seed=0, max_len=s.max_len,
                      image_size=s.image_size)
    train, held_out = task.train, task.eval
    if select:
        perm = torch.randperm(len(train["labels"]), generator=torch.Generator().manual_seed(0))
        n_val = len(perm) // 5
        train, held_out = _subset(train, perm[n_val:]), _subset(train, perm[:n_val])
    set_seed(seed)
    model, info = VARIANTS[variant](task, s.targets)
    n_adapter = sum(p.numel() for _, p in param_groups(model)["adapter"])
    out = train_run(model, info, train, s, lr, seed)
    acc = _accuracy(model, held_out)
    return {"suite": suite, "variant": variant, "seed": seed, "lr": lr, "phase": "select" if select else "test",
            "settings": asdict(s), "rank": info["rank"], "adapter_params": n_adapter, "accuracy": acc, **out}


def load_runs(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _done(runs, suite, variant, seed, lr, phase) -> dict | None:
    s = asdict(SUITES[suite])
    return next((r for r in runs if (r["suite"], r["variant"], r["seed"], r["phase"]) == (suite, variant, seed, phase)
                 and math.isclose(r["lr"], lr) and r["settings"] == s), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES))
    ap.add_argument("--variants", default="lora,lava", help=f"comma-separated, from {sorted(VARIANTS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr", type=float, help="adapter lr (default: the suite's)")
    ap.add_argument("--select-lr", action="store_true", help="choose each variant's lr on a validation split first")
    ap.add_argument("--lr-grid", default="1e-3,3e-3,1e-2")
    ap.add_argument("--n-train", type=int)
    ap.add_argument("--n-eval", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--image-size", type=int, help="vision suites: input size in px (default 64)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--report", action="store_true", help="only rewrite evidence.md from the records")
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "evidence.runs.jsonl"
    argv_list = sys.argv[1:] if argv is None else list(argv)
    if ns.report or ns.suite is None:
        print(f"wrote {write_report(out, load_runs(path))}")
        return 0
    s = SUITES[ns.suite]
    for key in ("n_train", "n_eval", "epochs", "image_size"):
        if getattr(ns, key) is not None:
            setattr(s, key, getattr(ns, key))
    variants = ns.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    seeds = [int(x) for x in ns.seeds.split(",")]
    t0 = time.perf_counter()

    def record(suite, variant, seed, lr, select):
        runs = load_runs(path)
        hit = _done(runs, suite, variant, seed, lr, "select" if select else "test")
        if hit is not None:
            return hit
        rec = run_one(suite, variant, seed, lr, select)
        rec["meta"] = run_meta("benchmarks.quality.evidence", argv_list, ns.threads, {}, t0)
        with open(path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(f"  {suite} {variant} seed {seed} lr {lr:g} {'(val)' if select else ''}: {100 * rec['accuracy']:.1f}% "
              f"({rec['adapter_params']:,d} adapter params, {rec['train_seconds']:.0f}s)", flush=True)
        write_report(out, load_runs(path))
        return rec

    lrs = {}
    for v in variants:
        if ns.select_lr:
            grid = [float(x) for x in ns.lr_grid.split(",")]
            scores = [(record(ns.suite, v, 0, lr, True)["accuracy"], -lr) for lr in grid]
            lrs[v] = -max(scores)[1]
        else:
            lrs[v] = ns.lr if ns.lr is not None else s.lr
    for seed in seeds:
        for v in variants:
            record(ns.suite, v, seed, lrs[v], False)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min; lrs {lrs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
