"""Shared-input fusion alone: one q/k/v group (and one gate/up pair) at MiniLM / TinyLlama sizes, fused vs not.

    python -m benchmarks.fusion_micro --out benchmarks/results/fusion-micro.md

Three (or two) frozen ``nn.Linear(I, O)`` reading one input ``x (B, T, I)`` that requires grad,
LoRA r=8 on each; a pass is forward + ``backward`` of ``Σ_i ⟨y_i, g_i⟩`` (fixed random ``g_i``),
i.e. everything the group costs in a training step except the optimizer.  The fused and unfused
modules alternate ``--reps`` times in one process; the minimum and the median are reported
(the minimum is the robust figure on a shared machine: load only adds time).
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


def build(width: int, outs: list[int], fused: bool, r: int):
    torch.manual_seed(0)
    model = lp.adapt(Siblings(width, outs), lp.LoraConfig(r=r, alpha=2 * r, target_modules=[f"p{i}" for i in range(len(outs))]))
    model.shared_input_fusion = fused
    return model


def one_pass(model, x, grads) -> float:
    t0 = time.perf_counter()
    outs = model(x)
    torch.autograd.backward(outs, grads)
    elapsed = time.perf_counter() - t0
    x.grad = None
    model.zero_grad(set_to_none=True)
    return elapsed


def run_case(tokens: int, width: int, outs: list[int], reps: int, r: int) -> dict:
    x = torch.randn(tokens, width, requires_grad=True)
    grads = [torch.randn(tokens, o) for o in outs]
    models = {"fused": build(width, outs, True, r), "unfused": build(width, outs, False, r)}
    for model in models.values():
        for _ in range(3):  # the first pass observes the group; then warm
            one_pass(model, x, grads)
    times = {k: [] for k in models}
    for i in range(reps):
        for name in (("fused", "unfused") if i % 2 == 0 else ("unfused", "fused")):
            times[name].append(one_pass(models[name], x, grads))
    return {k: {"min_ms": min(v) * 1e3, "median_ms": statistics.median(v) * 1e3} for k, v in times.items()}


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
             "| group | fused min ms | unfused min ms | fused / unfused (min) | fused median ms | unfused median ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, (tokens, width, outs) in CASES.items():
        if args.cases and args.cases not in name:
            continue
        print(f"[fusion_micro] {name} ...", flush=True)
        res = run_case(tokens, width, outs, args.reps, args.rank)
        f, u = res["fused"], res["unfused"]
        lines.append(f"| {name} | {f['min_ms']:.2f} | {u['min_ms']:.2f} | {f['min_ms'] / u['min_ms']:.3f} "
                     f"| {f['median_ms']:.2f} | {u['median_ms']:.2f} |")
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
