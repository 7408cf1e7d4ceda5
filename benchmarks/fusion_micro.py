"""Shared-input fusion alone: one q/k/v group (and one gate/up pair) at MiniLM / TinyLlama sizes, fused vs not.

    python -m benchmarks.fusion_micro --out benchmarks/results/fusion-micro.md

Three (or two) frozen ``nn.Linear(I, O)`` reading one input ``x (B, T, I)`` that requires grad,
LoRA r=8 on each; a pass is forward + ``backward`` of ``Σ_i ⟨y_i, g_i⟩`` (fixed random ``g_i``),
i.e. everything the group costs in a training step except the optimizer.  The fused and unfused
modules alternate ``--reps`` times in one process; the minimum and the median are reported
The headline figure is the median *CPU time* of this process per pass (with one torch thread it
excludes the time the thread waits descheduled, which dominates wall time on a busy machine);
the wall-clock minimum is given beside it.  Rows: the default
fused node (forward products per layer, backward fused), ``fused+concat`` (``concat_forward``: the
forward ``H`` as one GEMM too) and the unfused per-layer nodes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

import lava_peft as lp
from lava_peft.inject import shared_input_groups

from .harness import environment

CASES = {  # name: (tokens B×T, in, [outs])
    "MiniLM q/k/v (2048×384 → 3×384)": (32 * 64, 384, [384, 384, 384]),
    "TinyLlama q/k/v (256×2048 → 2048, 256, 256)": (256, 2048, [2048, 256, 256]),
    "TinyLlama gate/up (256×2048 → 2×5632)": (256, 2048, [5632, 5632]),
}


class Siblings(nn.Module):
    def __init__(self, width: int, outs: list[int]):
        super().__init__()
        self.names = [f"p{i}" for i in range(len(outs))]
        for name, out in zip(self.names, outs):
            setattr(self, name, nn.Linear(width, out))

    def forward(self, x):
        return [getattr(self, n)(x) for n in self.names]


def build(width: int, outs: list[int], mode: str, r: int):
    """``mode``: "fused" (default node), "fused+concat" (the forward H as one GEMM too), "unfused"."""
    torch.manual_seed(0)
    model = lp.adapt(Siblings(width, outs), lp.LoraConfig(r=r, alpha=2 * r, target_modules=[f"p{i}" for i in range(len(outs))]))
    model.shared_input_fusion = mode != "unfused"
    return model


def one_pass(model, x, grads) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one forward + backward."""
    t0, c0 = time.perf_counter(), time.process_time()
    outs = model(x)
    torch.autograd.backward(outs, grads)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    x.grad = None
    model.zero_grad(set_to_none=True)
    return elapsed, cpu


def run_case(tokens: int, width: int, outs: list[int], reps: int, r: int) -> dict:
    x = torch.randn(tokens, width, requires_grad=True)
    grads = [torch.randn(tokens, o) for o in outs]
    modes = ("fused", "fused+concat", "unfused")
    models = {m: build(width, outs, m, r) for m in modes}
    for mode, model in models.items():
        for _ in range(3):  # the first pass observes the group; then warm
            one_pass(model, x, grads)
        for group in shared_input_groups(model.model):
            group.concat_forward = mode == "fused+concat"
    times = {k: [] for k in models}
    for i in range(reps):
        for name in modes[i % 3:] + modes[: i % 3]:
            times[name].append(one_pass(models[name], x, grads))
    return {k: {"min_ms": min(w for w, _ in v) * 1e3, "median_ms": statistics.median(w for w, _ in v) * 1e3,
                "cpu_median_ms": statistics.median(c for _, c in v) * 1e3} for k, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fusion_micro", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--cases", help="substring filter on the case names")
    ap.add_argument("--out", help="markdown path (default: print)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    lines = ["# Shared-input fusion alone: one group, forward + backward", "",
             f"- date (UTC): {env['date_utc']}",
             f"- command: `python -m benchmarks.fusion_micro {' '.join(sys.argv[1:] if argv is None else argv)}`",
             f"- CPU: {env['cpu']}, {env['cpu_count']} cores, torch threads {torch.get_num_threads()}",
             f"- torch {env['torch']}, lava-peft {env['lava_peft']} (git {env['git']})",
             f"- load average at start: {env.get('loadavg_start')}", f"- LoRA r={args.rank} on every layer; "
             f"{args.reps} alternating passes per row", "",
             "| group | CPU ms fused | CPU ms fused+concat | CPU ms unfused | fused / unfused (CPU) "
             "| fused+concat / unfused (CPU) | wall min ms fused / fused+concat / unfused |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, (tokens, width, outs) in CASES.items():
        if args.cases and args.cases not in name:
            continue
        print(f"[fusion_micro] {name} ...", flush=True)
        res = run_case(tokens, width, outs, args.reps, args.rank)
        f, c, u = res["fused"], res["fused+concat"], res["unfused"]
        lines.append(f"| {name} | {f['cpu_median_ms']:.2f} | {c['cpu_median_ms']:.2f} | {u['cpu_median_ms']:.2f} "
                     f"| {f['cpu_median_ms'] / u['cpu_median_ms']:.3f} | {c['cpu_median_ms'] / u['cpu_median_ms']:.3f} "
                     f"| {f['min_ms']:.1f} / {c['min_ms']:.1f} / {u['min_ms']:.1f} |")
    if hasattr(os, "getloadavg"):
        lines.append(f"\n- load average at end: {[round(x, 2) for x in os.getloadavg()]}")
    text = "\n".join(lines) + "\n"
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, args.out)
    print(text)


if __name__ == "__main__":
    main()
