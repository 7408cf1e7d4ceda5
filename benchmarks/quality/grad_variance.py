"""Does LAVA's orthogonality regularizer lower the gradient variance?  What does it cost per step?

    python -m benchmarks.quality.grad_variance --out benchmarks/results            # reduced size (default)
    python -m benchmarks.quality.grad_variance --n-train 4000 --n-eval 2000 --epochs 3 --seeds 0,1,2,3,4   # full

Task: CRAFT VGG16-BN (its 12 dense 3×3 convs adapted by LAVA CP at the rank matching LoRA r = 8,
alpha = 2r, U orthonormal / V = 0) on Fashion-MNIST, the conv task where LAVA beats LoRA in
``quality.md``.  For each λ in ``--lambdas`` and each seed the model trains (AdamW, warm-up +
cosine, BatchNorm statistics frozen, ``CE + λ·R``) and, at fixed fractions of training
(``--probe-at``), :func:`lava_peft.diagnostics.gradient_variance` measures the across-minibatch
variance of the adapter gradients of the *data loss* on a fixed probe set (the same minibatches
for every run).  At a fixed state the regularizer's gradient is the same for every minibatch, so
it can only change the variance through the state it leads training to — which is what this
tracks.  Per step the orth term's own forward + backward is timed apart from the data loss's
(same step, gradients accumulate), giving its wall-clock share.  Also recorded: the per-step
losses (their spread across seeds) and the held-out accuracy (the λ sweep).

Writes ``<out>/grad_variance.json`` (every run) and ``<out>/grad_variance.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lava_peft.diagnostics import gradient_variance
from lava_peft.train import set_seed
from lava_peft.train.tasks import build_task
from lava_peft.train.trainer import default_forward

from .common import lr_factor, run_meta
from .evidence import _accuracy, _freeze_bn_train, _subset
from .evidence_variants import _lava


def data_loss(model, batch):
    return F.cross_entropy(default_forward(model, batch).float(), batch["labels"])


def run(lam: float, seed: int, ns) -> dict:
    set_seed(seed)
    task = build_task("craft_vgg16_bn", "fashion_mnist", n_train=ns.n_train, n_eval=ns.n_eval, seed=0,
                      image_size=ns.image_size)
    g0 = torch.Generator().manual_seed(0)
    probe_idx = torch.randperm(len(task.train["labels"]), generator=g0)[:ns.probe_batches * ns.batch_size]
    probe = [_subset(task.train, probe_idx[i:i + ns.batch_size]) for i in range(0, len(probe_idx), ns.batch_size)]
    set_seed(seed)
    model, info = _lava(task, "all-conv", orth_lambda=lam)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ns.lr, weight_decay=0.0)
    n = len(task.train["labels"])
    total = math.ceil(n / ns.batch_size) * ns.epochs
    warmup = max(1, int(0.06 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, total, warmup))
    probe_steps = sorted({min(total, round(f * total)) for f in ns.probe_at})
    gen = torch.Generator().manual_seed(seed)
    losses, t_data, t_reg, probes = [], [], [], []
    step = 0

    def do_probe():
        _freeze_bn_train(model)
        res = gradient_variance(model, probe, data_loss)
        probes.append({"step": step, "var": res["total"]["var"], "mean_sq": res["total"]["mean_sq"],
                       "layers": {p: e["var"] for p, e in res["layers"].items()}})

    for _ in range(ns.epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, ns.batch_size):
            if step in probe_steps:
                do_probe()
            _freeze_bn_train(model)
            batch = _subset(task.train, order[i:i + ns.batch_size])
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = data_loss(model, batch)
            loss.backward()
            t1 = time.perf_counter()
            reg = model.regularization_loss()
            if reg.requires_grad:
                reg.backward()
            t2 = time.perf_counter()
            opt.step()
            sched.step()
            losses.append(round(loss.item(), 5))
            t_data.append(t1 - t0)
            t_reg.append(t2 - t1)
            step += 1
    if step in probe_steps:
        do_probe()
    return {"lambda": lam, "seed": seed, "rank": info["rank"], "losses": losses, "probes": probes,
            "t_data_s": sum(t_data), "t_reg_s": sum(t_reg), "steps": step, "accuracy": _accuracy(model, task.eval)}


def _ms(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def _cell(xs, digits: str = ".3g") -> str:
    """``mean ± std``, or the single value when there is one seed (no ``± nan``)."""
    if len(xs) == 1:
        return format(xs[0], digits)
    m, sd = _ms(xs)
    return f"{format(m, digits)} ± {sd:.2g}"


def report(result: dict) -> str:
    runs, meta = result["runs"], result["meta"]
    s = meta["settings"]
    lams = sorted({r["lambda"] for r in runs})
    lines = ["# Gradient variance and cost of LAVA's orthogonality regularizer", "",
             f"- command: `{meta['command']}`", f"- machine: {meta['machine']}", f"- versions: {meta['versions']}",
             f"- settings: {s}", f"- wall time: {meta['wall_s'] / 60:.1f} min", "",
             ("**Full size** (4k train, 3 epochs)" if s.get("n_train", 0) >= 4000 and s.get("epochs", 0) >= 3 else
              "**Reduced size**: the full-size run (4k train, 3 epochs, 5 seeds) is the second command of "
              "`python -m benchmarks.quality.grad_variance --help`")
             + f"; seeds run: {sorted({r['seed'] for r in runs})}.", "",
             "## Trace of the gradient covariance across minibatches (data loss, adapter tensors, all layers)", "",
             "mean ± std over seeds; `var/‖ḡ‖²` is the noise-to-signal ratio at that state.", ""]
    steps = sorted({p["step"] for r in runs for p in r["probes"]})
    lines += ["| λ | " + " | ".join(f"step {k}: var" for k in steps) + " | " + " | ".join(
        f"step {k}: var/‖ḡ‖²" for k in steps) + " |", "|---|" + "---|" * (2 * len(steps))]
    for lam in lams:
        rs = [r for r in runs if r["lambda"] == lam]
        cells, ratios = [], []
        for k in steps:
            v = [p["var"] for r in rs for p in r["probes"] if p["step"] == k]
            q = [p["var"] / p["mean_sq"] for r in rs for p in r["probes"] if p["step"] == k and p["mean_sq"] > 0]
            cells.append(_cell(v))
            ratios.append(_cell(q) if q else "-")
        lines.append(f"| {lam:g} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines += ["", "## Loss-curve spread across seeds, held-out accuracy (λ sweep), cost of the orth term", "",
              "`loss std` = std across seeds of the per-step training loss, averaged over the steps of the last "
              "half of training; `orth share` = the orth term's forward + backward time over the whole step's "
              "forward + backward (data loss + orth term), summed over the run.", "",
              "| λ | seeds | final loss (mean of last 10 steps) | loss std across seeds | held-out accuracy % | "
              "orth share of fwd+bwd | orth s/step |", "|---|---|---|---|---|---|---|"]
    for lam in lams:
        rs = [r for r in runs if r["lambda"] == lam]
        last = [statistics.mean(r["losses"][-10:]) for r in rs]
        half = len(rs[0]["losses"]) // 2
        per_step = [statistics.stdev(col) for col in zip(*[r["losses"][half:] for r in rs])] if len(rs) > 1 else [0]
        share = [r["t_reg_s"] / (r["t_reg_s"] + r["t_data_s"]) for r in rs]
        acc = [100 * r["accuracy"] for r in rs]
        spread = f"{statistics.mean(per_step):.3f}" if len(rs) > 1 else "– (1 seed)"
        lines.append(f"| {lam:g} | {len(rs)} | {_cell(last, '.3f')} | {spread} | {_cell(acc, '.1f')} | "
                     "%.2f %% | %.4f |" % (100 * statistics.mean(share),
                                           statistics.mean(r["t_reg_s"] / r["steps"] for r in rs)))
    lines += [""] + result.get("notes", [])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lambdas", default="0,0.01,0.1,1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-train", type=int, default=320)
    ap.add_argument("--n-eval", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--probe-batches", type=int, default=6, help="minibatches of the fixed probe set")
    ap.add_argument("--probe-at", default="0,0.25,0.5,1", help="fractions of training at which to probe")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results")
    ns = ap.parse_args(argv)
    ns.probe_at = [float(x) for x in ns.probe_at.split(",")]
    torch.set_num_threads(ns.threads)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = []
    for seed in [int(x) for x in ns.seeds.split(",")]:
        for lam in [float(x) for x in ns.lambdas.split(",")]:
            r = run(lam, seed, ns)
            runs.append(r)
            print(f"λ={lam:g} seed {seed}: acc {100 * r['accuracy']:.1f}%, var {[round(p['var'], 4) for p in r['probes']]}, "
                  f"orth {r['t_reg_s']:.2f}s of {r['t_reg_s'] + r['t_data_s']:.1f}s", flush=True)
            settings = {k: v for k, v in vars(ns).items() if k not in ("out", "threads")}
            result = {"meta": run_meta("benchmarks.quality.grad_variance", sys.argv[1:] if argv is None else argv,
                                       ns.threads, settings, t0), "runs": runs}
            (out / "grad_variance.json").write_text(json.dumps(result))
            (out / "grad_variance.md").write_text(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
