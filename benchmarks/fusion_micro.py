"""Shared-input fusion alone: one q/k/v group (and one gate/up pair) at MiniLM / TinyLlama sizes, fused vs not.

    python -m benchmarks.fusion_micro --out benchmarks/results/fusion-micro.md
    python -m benchmarks.fusion_micro --device cuda --out /tmp/gpu-fusion_micro.md --json /tmp/gpu-fusion_micro.json

Three (or two) frozen ``nn.Linear(I, O)`` reading one input ``x (B, T, I)`` that requires grad,
LoRA r=8 on each; a pass is forward + ``backward`` of ``Σ_i ⟨y_i, g_i⟩`` (fixed random ``g_i``),
i.e. everything the group costs in a training step except the optimizer.  The fused and unfused
modules alternate ``--reps`` times in one process; the minimum and the median are reported
The headline figure is the median *CPU time* of this process per pass (with one torch thread it
excludes the time the thread waits descheduled, which dominates wall time on a busy machine);
the wall-clock minimum is given beside it.  Rows: the default
fused node (forward products per layer, backward fused), ``fused+concat`` (``concat_forward``: the
forward ``H`` as one GEMM too) and the unfused per-layer nodes.  With ``--device cuda`` the
modules and tensors live on the GPU, every pass is bracketed by ``torch.cuda.synchronize()``, the
headline is the median *wall* time per pass (the CPU time of the launching thread says little
there), and each row records the peak ``torch.cuda.max_memory_allocated`` of one pass.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

import lava_peft as lp
from lava_peft.inject import shared_input_groups

from .harness import benchmark_device, environment, gpu_lines, peak_memory_gib, reset_peak_memory, sync, write_texts

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
    """(wall seconds, CPU seconds of this process) of one forward + backward (device-synchronised)."""
    sync(x.device)
    t0, c0 = time.perf_counter(), time.process_time()
    outs = model(x)
    torch.autograd.backward(outs, grads)
    sync(x.device)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    x.grad = None
    model.zero_grad(set_to_none=True)
    return elapsed, cpu


def run_case(tokens: int, width: int, outs: list[int], reps: int, r: int,
             device: torch.device = torch.device("cpu")) -> dict:
    x = torch.randn(tokens, width).to(device).requires_grad_(True)
    grads = [torch.randn(tokens, o).to(device) for o in outs]
    modes = ("fused", "fused+concat", "unfused")
    models = {m: build(width, outs, m, r).to(device) for m in modes}
    peaks = {}
    for mode, model in models.items():
        for _ in range(3):  # the first pass observes the group; then warm
            one_pass(model, x, grads)
        for group in shared_input_groups(model.model):
            group.concat_forward = mode == "fused+concat"
        reset_peak_memory(device)
        one_pass(model, x, grads)
        peaks[mode] = peak_memory_gib(device)
    times = {k: [] for k in models}
    for i in range(reps):
        for name in modes[i % 3:] + modes[: i % 3]:
            times[name].append(one_pass(models[name], x, grads))
    res = {k: {"min_ms": min(w for w, _ in v) * 1e3, "median_ms": statistics.median(w for w, _ in v) * 1e3,
               "cpu_median_ms": statistics.median(c for _, c in v) * 1e3} for k, v in times.items()}
    for mode, peak in peaks.items():
        if peak is not None:
            res[mode]["peak_mem_gib"] = peak
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fusion_micro", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--cases", help="substring filter on the case names")
    ap.add_argument("--out", help="markdown path (default: print)")
    ap.add_argument("--json", help="also write the figures as JSON here")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: synchronised wall-time medians and peak GPU memory instead of CPU time")
    args = ap.parse_args(argv)
    device = benchmark_device(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    env["command"] = f"python -m benchmarks.fusion_micro {' '.join(sys.argv[1:] if argv is None else argv)}"
    # the headline: this process's CPU time on the CPU, synchronised wall time on the GPU
    key, label = ("median_ms", "GPU wall") if device.type == "cuda" else ("cpu_median_ms", "CPU")
    lines = ["# Shared-input fusion alone: one group, forward + backward", "",
             f"- date (UTC): {env['date_utc']}",
             f"- command: `{env['command']}`",
             f"- CPU: {env['cpu']}, {env['cpu_count']} cores, torch threads {torch.get_num_threads()}",
             *gpu_lines(env),
             f"- torch {env['torch']}, lava-peft {env['lava_peft']} (git {env['git']})",
             f"- load average at start: {env.get('loadavg_start')}", f"- LoRA r={args.rank} on every layer; "
             f"{args.reps} alternating passes per row", "",
             f"| group | {label} ms fused | {label} ms fused+concat | {label} ms unfused | fused / unfused ({label}) "
             f"| fused+concat / unfused ({label}) | wall min ms fused / fused+concat / unfused |"
             + (" peak MiB fused / unfused |" if device.type == "cuda" else ""),
             "|---|---:|---:|---:|---:|---:|---|" + ("---|" if device.type == "cuda" else "")]
    cases = []
    for name, (tokens, width, outs) in CASES.items():
        if args.cases and args.cases not in name:
            continue
        print(f"[fusion_micro] {name} ...", flush=True)
        res = run_case(tokens, width, outs, args.reps, args.rank, device)
        cases.append({"case": name, "tokens": tokens, "in": width, "outs": outs, **res})
        f, c, u = res["fused"], res["fused+concat"], res["unfused"]
        lines.append(f"| {name} | {f[key]:.2f} | {c[key]:.2f} | {u[key]:.2f} "
                     f"| {f[key] / u[key]:.3f} | {c[key] / u[key]:.3f} "
                     f"| {f['min_ms']:.1f} / {c['min_ms']:.1f} / {u['min_ms']:.1f} |"
                     + (f" {f['peak_mem_gib'] * 1024:,.0f} / {u['peak_mem_gib'] * 1024:,.0f} |"
                        if "peak_mem_gib" in f else ""))
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        lines.append(f"\n- load average at end: {env['loadavg_end']}")
    text = "\n".join(lines) + "\n"
    outputs = [(args.out, text)]
    if args.json:
        result = {"environment": env, "rank": args.rank, "reps": args.reps, "headline": key, "cases": cases}
        outputs.append((args.json, json.dumps(result, indent=1) + "\n"))
    write_texts(outputs)
    print(text)


if __name__ == "__main__":
    main()
