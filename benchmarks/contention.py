"""Does our lead over HF PEFT survive a busy CPU?  torch threads 1 vs 2, with and without competing jobs.

    python -m benchmarks.contention --compete 0,2 --out benchmarks/results/cpu-minilm-contention.md

Builds the ``cpu-minilm`` rows (frozen, HF PEFT LoRA, our LoRA and LAVA, fusion on; the same models,
batch and step as ``python -m benchmarks.run cpu-minilm``) once, then for each ``--compete`` level
starts that many competing processes (each a 1-thread fp32 GEMM loop, like another job's
training), and runs ``--passes`` passes; a pass times one training step of every row at every
``--threads`` setting (order rotated each pass), so load changes hit all cells alike.  Reported:
median step time per cell, and per-pass ratios (median) to the frozen row and to PEFT at the same
thread count.  The competitors are stopped (by their own process ids) before the next level.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

from .harness import environment, timed_step, train_step
from .run import parse_args as parse_run_args
from .scenarios import SCENARIOS


def _burn(stop_after: float) -> None:
    """A competing job: one thread of fp32 GEMMs until ``stop_after`` seconds have passed."""
    torch.set_num_threads(1)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    end = time.time() + stop_after
    while time.time() < end:
        a = (a @ b).clamp_(-1, 1)


def per_op_penalty(reps: int = 30) -> list[dict]:
    """Single ops of a MiniLM layer timed with 1 and 2 torch threads, interleaved (what one parallel region costs
    when the cores are busy): min and median per op and thread count."""
    n, width, r = 32 * 64, 384, 8
    x, down, w, y = torch.randn(n, width), torch.randn(r, width), torch.randn(width, width), torch.randn(n, width)
    ops = {"thin product x·Vᵀ (2048×384 · 384×8)": lambda: x @ down.T,
           "base GEMM x·Wᵀ (2048×384 · 384×384)": lambda: x @ w.T,
           "elementwise 0.5·y (2048×384)": lambda: y * 0.5,
           "tiny add (8×384)": lambda: down + 1}
    times: dict = {}
    before = torch.get_num_threads()
    for _ in range(reps):
        for t in (1, 2):
            torch.set_num_threads(t)
            for name, op in ops.items():
                t0 = time.perf_counter()
                op()
                times.setdefault((name, t), []).append(time.perf_counter() - t0)
    torch.set_num_threads(before)
    return [{"op": name, "threads": t, "min_ms": min(v) * 1e3, "median_ms": statistics.median(v) * 1e3}
            for (name, t), v in times.items()]


def run_level(variants, threads: list[int], passes: int, warmup: int, device) -> dict:
    cells = [(t, v) for t in threads for v in variants]
    for t, v in cells:
        torch.set_num_threads(t)
        for _ in range(warmup):
            train_step(v, v.make_batch(), device)
    times = {(t, v.name): [] for t, v in cells}
    for p in range(passes):
        shift = p % len(cells)
        for t, v in cells[shift:] + cells[:shift]:
            torch.set_num_threads(t)
            times[(t, v.name)].append(timed_step(v, device))
    return times


def summarize(times: dict, threads: list[int], names: list[str]) -> list[dict]:
    rows = []
    for t in threads:
        frozen, peft = times.get((t, "frozen")), times.get((t, "peft-lora"))
        for name in names:
            own = times[(t, name)]
            row = {"threads": t, "name": name, "step_ms": statistics.median(own) * 1e3,
                   "p20_ms": sorted(own)[max(0, int(0.2 * len(own)) - 1)] * 1e3}
            if frozen:
                row["x_frozen"] = statistics.median(f / o for f, o in zip(frozen, own))
            if peft:
                row["x_peft"] = statistics.median(p / o for p, o in zip(peft, own))
            rows.append(row)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.contention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="frozen,peft-lora,lava-lora,lava")
    ap.add_argument("--threads", default="1,2", help="torch thread counts to alternate")
    ap.add_argument("--compete", default="0", help="numbers of competing 1-thread GEMM processes, one level each")
    ap.add_argument("--passes", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--per-op", action="store_true", help="also time single ops with 1 and 2 threads (per level)")
    ap.add_argument("--out", help="markdown path (default: print)")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    levels = [int(c) for c in args.compete.split(",")]
    run_argv = ["cpu-minilm", "--device", "cpu", "--variants", args.variants]
    for flag in ("batch", "seq"):
        if getattr(args, flag):
            run_argv += [f"--{flag}", str(getattr(args, flag))]
    device = torch.device("cpu")
    env = environment(device)
    scenario = SCENARIOS["cpu-minilm"](parse_run_args(run_argv), device)
    for v in scenario.variants:
        v.setup()
    names = [v.name for v in scenario.variants]
    results = []
    ctx = mp.get_context("spawn")
    for level in levels:
        procs = [ctx.Process(target=_burn, args=(3600.0,), daemon=True) for _ in range(level)]
        for proc in procs:
            proc.start()
        time.sleep(2.0 if procs else 0.0)
        load_start = os.getloadavg()
        try:
            print(f"[contention] {level} competing processes, threads {threads} ...", flush=True)
            ops = per_op_penalty() if args.per_op else []
            times = run_level(scenario.variants, threads, args.passes, args.warmup, device)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.join()
        results.append({"compete": level, "loadavg_start": [round(x, 2) for x in load_start],
                        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                        "rows": summarize(times, threads, names), "ops": ops})
    command = "python -m benchmarks.contention " + " ".join(sys.argv[1:] if argv is None else argv)
    text = to_markdown(env, scenario.setup, results, command, args.passes)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
    print(text)
    return {"environment": env, "results": results}


def to_markdown(env, setup, results, command, passes) -> str:
    lines = ["# `cpu-minilm` under CPU contention: torch threads × competing jobs", "",
             f"- date (UTC): {env['date_utc']}", f"- command: `{command}`",
             f"- CPU: {env['cpu']}, {env['cpu_count']} cores",
             f"- torch {env['torch']}, peft {env['peft']}, transformers {env['transformers']}, "
             f"lava-peft {env['lava_peft']} (git {env['git']})",
             f"- load average before the run: {env.get('loadavg_start')}",
             f"- setup: {setup}; {passes} interleaved passes per level, one timed step per row and thread count each",
             ""]
    for level in results:
        lines += [f"## {level['compete']} competing 1-thread GEMM processes "
                  f"(load average {level['loadavg_start']} → {level['loadavg_end']})", "",
                  "| torch threads | variant | step ms (median) | p20 ms | × frozen (paired) | × PEFT (paired) |",
                  "|---:|---|---:|---:|---:|---:|"]
        for r in level["rows"]:
            xf = f"{r['x_frozen']:.3f}" if "x_frozen" in r else "—"
            xp = f"{r['x_peft']:.3f}" if "x_peft" in r else "—"
            lines.append(f"| {r['threads']} | {r['name']} | {r['step_ms']:.1f} | {r['p20_ms']:.1f} | {xf} | {xp} |")
        lines.append("")
        if level.get("ops"):
            lines += ["| single op | torch threads | min ms | median ms |", "|---|---:|---:|---:|"]
            for o in level["ops"]:
                lines.append(f"| {o['op']} | {o['threads']} | {o['min_ms']:.3f} | {o['median_ms']:.3f} |")
            lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
