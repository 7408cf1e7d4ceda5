"""Where a training step's time goes: torch.profiler (CPU) over a scenario's variants.

    python -m benchmarks.profile_step --out benchmarks/results/cpu-minilm-profile.md
    python -m benchmarks.profile_step --scenario cpu-conv --variants frozen,peft-lora-conv,lava-lora-conv-peft-targets \
        --out benchmarks/results/cpu-conv-profile.md
    python -m benchmarks.profile_step --variants lava,lava-unfused --steps 2 --warmup 1 --batch 8 --out /tmp/p.md

Each variant of the scenario (default :func:`benchmarks.scenarios.cpu_minilm`: the same models,
batch and step as ``python -m benchmarks.run cpu-minilm --fusion``; ``--scenario cpu-conv`` with
``--backbone``: the conv rows of ``python -m benchmarks.run cpu-conv``) runs ``--warmup`` steps, ``--timed`` unprofiled
steps (median = the step time reported), then ``--steps`` profiled steps.  The table lists the
ops with the largest *self* CPU time and their share of the summed self time of all ops (the
step's CPU time, profiler overhead included); ``thin`` products are ``mm``/``addmm`` calls with an
operand dimension ≤ 32 (the rank-8 adapter products, or ``Σr = 24`` for a fused q/k/v group).
Everything runs in one process; with other jobs on the machine the absolute figures move, the
shares much less.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from .harness import environment, record_load_end, train_step, write_texts
from .run import parse_args as parse_run_args
from .scenarios import SCENARIOS

THIN = 32
CATEGORIES = (  # (category, op-name predicate), first match wins
    ("GEMM (mm/addmm/bmm)", lambda n: n in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul")),
    ("convolution (forward + backward)", lambda n: "conv" in n),
    ("batch norm", lambda n: "batch_norm" in n),
    ("attention (sdpa)", lambda n: "attention" in n or "softmax" in n),
    ("optimizer (AdamW foreach)", lambda n: n.startswith("aten::_foreach") or "adamw" in n.lower() or "Optimizer" in n),
    ("layer norm", lambda n: "layer_norm" in n),
    ("dropout / random", lambda n: "dropout" in n or "bernoulli" in n or "uniform" in n or "randint" in n),
    ("GELU", lambda n: "gelu" in n),
    ("copies / casts / cat", lambda n: n in ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::cat",
                                            "aten::clone", "aten::index_select", "aten::t", "aten::transpose")),
    ("elementwise (add/mul/div/...)", lambda n: n in ("aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::div",
                                                      "aten::sub", "aten::sum", "aten::fill_", "aten::zero_",
                                                      "aten::zeros", "aten::addcmul_", "aten::addcdiv_", "aten::sqrt",
                                                      "aten::pow", "aten::neg", "aten::where", "aten::masked_fill")),
    ("allocation", lambda n: n in ("aten::empty", "aten::empty_strided", "aten::new_empty", "aten::resize_")),
)


def _category(name: str) -> str:
    for label, test in CATEGORIES:
        if test(name):
            return label
    return "other (autograd bookkeeping, views, Python ops)"


def _is_thin(shapes) -> bool:
    dims = [d for shape in shapes or [] if shape for d in shape]
    return len(dims) >= 3 and min(dims) <= THIN


def profile_variant(v, device, warmup: int, timed: int, steps: int) -> dict:
    v.setup()
    for _ in range(warmup):
        train_step(v, v.make_batch(), device)
    times = []
    for _ in range(timed):
        batch = v.make_batch()
        t0 = time.perf_counter()
        train_step(v, batch, device)
        times.append(time.perf_counter() - t0)
    batches = [v.make_batch() for _ in range(steps)]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for batch in batches:
            train_step(v, batch, device)
    ops, cats = defaultdict(float), defaultdict(float)
    thin = thin_calls = 0.0
    for evt in prof.key_averages(group_by_input_shape=True):
        self_us = evt.self_cpu_time_total
        ops[evt.key] += self_us
        cats[_category(evt.key)] += self_us
        if evt.key in ("aten::mm", "aten::addmm", "aten::addmm_") and _is_thin(evt.input_shapes):
            thin += self_us
            thin_calls += evt.count
    total = sum(ops.values())
    calls = defaultdict(int)
    for evt in prof.key_averages():
        calls[evt.key] += evt.count
    return {
        "name": v.name,
        "step_ms": statistics.median(times) * 1e3,
        "profiled_step_ms": total / 1e3 / steps,
        "ops": sorted(((k, t / total, calls[k] / steps) for k, t in ops.items()), key=lambda r: -r[1]),
        "categories": sorted(((k, t / total) for k, t in cats.items()), key=lambda r: -r[1]),
        "thin_share": thin / total,
        "thin_calls_per_step": thin_calls / steps,
        "aten_calls_per_step": sum(calls[k] for k in calls if k.startswith("aten::")) / steps,
        "fused_groups": _fused_groups(v.module),
    }


def _fused_groups(module) -> int | None:
    try:
        from lava_peft.fused_siblings import SiblingGroup
        from lava_peft.inject import shared_input_groups
    except ImportError:  # pragma: no cover
        return None
    inner = getattr(module, "model", None)
    if inner is None or not hasattr(module, "shared_input_fusion"):
        return None
    return sum(1 for g in shared_input_groups(inner) if isinstance(g, SiblingGroup) and g.fused_calls > 0)


def to_markdown(env: dict, setup: str, results: list[dict], top: int, command: str) -> str:
    scenario = command.split("--scenario ")[1].split()[0] if "--scenario " in command else "cpu-minilm"
    lines = [f"# Profile of one `{scenario}` training step (torch.profiler, CPU)", "",
             f"- date (UTC): {env['date_utc']}", f"- command: `{command}`",
             f"- CPU: {env['cpu']}, {env['cpu_count']} cores, torch threads {env['torch_threads']}",
             f"- torch {env['torch']}, peft {env['peft']}, transformers {env['transformers']}, "
             f"lava-peft {env['lava_peft']} (git {env['git']})",
             f"- load average at start/end: {env.get('loadavg_start')} / {env.get('loadavg_end')}",
             f"- setup: {setup}", "",
             "| variant | step ms (unprofiled, median) | profiled ms/step | aten calls/step | thin mm calls/step "
             "| thin mm share | fused groups |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['step_ms']:.1f} | {r['profiled_step_ms']:.1f} | {r['aten_calls_per_step']:.0f} "
                     f"| {r['thin_calls_per_step']:.0f} | {100 * r['thin_share']:.1f} % | "
                     f"{'—' if r['fused_groups'] is None else r['fused_groups']} |")
    lines += ["", "## Share of the step by category (self CPU time)", ""]
    cats = sorted({c for r in results for c, _ in r["categories"]})
    lines.append("| category | " + " | ".join(r["name"] for r in results) + " |")
    lines.append("|---|" + "---:|" * len(results))
    by = [{c: s for c, s in r["categories"]} for r in results]
    for c in sorted(cats, key=lambda c: -by[-1].get(c, 0)):
        lines.append(f"| {c} | " + " | ".join(f"{100 * b.get(c, 0):.1f} %" for b in by) + " |")
    for r in results:
        lines += ["", f"## Top {top} ops: `{r['name']}`", "", "| op | share of step | calls/step |", "|---|---:|---:|"]
        for name, share, n in r["ops"][:top]:
            lines.append(f"| `{name}` | {100 * share:.1f} % | {n:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="cpu-minilm", choices=["cpu-minilm", "cpu-conv"])
    p.add_argument("--backbone", help="cpu-conv: mobilenet_v2 (default) or craft_vgg16_bn")
    p.add_argument("--variants", default="frozen,peft-lora,lava-lora,lava-lora-unfused,lava,lava-unfused")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timed", type=int, default=3, help="unprofiled steps timed before profiling")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--threads", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", help="markdown path (default: print)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_argv = [args.scenario, "--device", "cpu", "--variants", args.variants]
    if args.scenario == "cpu-minilm":
        run_argv.append("--fusion")
    for flag in ("batch", "seq", "backbone"):
        if getattr(args, flag):
            run_argv += [f"--{flag}", str(getattr(args, flag))]
    device = torch.device("cpu")
    env = environment(device)
    scenario = SCENARIOS[args.scenario](parse_run_args(run_argv), device)
    results = []
    for v in scenario.variants:
        print(f"[profile] {v.name} ...", flush=True)
        results.append(profile_variant(v, device, args.warmup, args.timed, args.steps))
    record_load_end(env)
    command = "python -m benchmarks.profile_step " + " ".join(sys.argv[1:] if argv is None else argv)
    text = to_markdown(env, scenario.setup, results, args.top, command)
    write_texts(((args.out, text),))
    print(text)
    return results


if __name__ == "__main__":
    main()
