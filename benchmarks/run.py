"""Run one benchmark scenario and write JSON + a markdown table.

    python -m benchmarks.run cpu-minilm --device cpu --json benchmarks/results/cpu-minilm.json
    python -m benchmarks.run llm --device cuda --compile --json benchmarks/results/llm.json
    python -m benchmarks.run tiny --device cpu --json /tmp/tiny.json --steps 2 --warmup 1 --repeats 1

The markdown table is written next to the JSON (same name, ``.md``) unless ``--md`` says
otherwise.  See :mod:`benchmarks.harness` for what is measured and how.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .harness import environment, run_interleaved, summarize, write_results
from . import conv_scenarios  # noqa: F401  (registers cpu-conv, conv)
from .scenarios import SCENARIOS

DEFAULTS = {  # (steps, warmup, repeats)
    "tiny": (2, 1, 2),
    "cpu-minilm": (5, 3, 6),
    "llm": (10, 5, 3),
    "llm-quant": (10, 5, 3),
    "cnn": (10, 5, 3),
    "cpu-conv": (3, 1, 3),
    "minilm": (10, 5, 3),
    "conv": (10, 5, 3),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--json", dest="json_path", help="output JSON path (markdown goes beside it)")
    p.add_argument("--md", dest="md_path", help="output markdown path (default: JSON path with .md)")
    p.add_argument("--steps", type=int, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps per variant (compilation happens here)")
    p.add_argument("--repeats", type=int, help="rounds; the variant order rotates every round")
    p.add_argument("--variants", help="comma-separated subset of variant names")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--compile", action="store_true", help="also run torch.compile'd rows (text scenarios)")
    p.add_argument("--quant", choices=["bnb-4bit", "torchao-int8"], help="quantize the base linears (llm / llm-quant)")
    p.add_argument("--orth-lambda", type=float, default=0.1)
    p.add_argument("--shira", action="store_true", help="text scenarios: add SHiRA rows (HF PEFT and ours, r·(O+I) entries)")
    p.add_argument("--dora", action="store_true", help="text scenarios: add DoRA rows (HF PEFT use_dora, our LoRA and LAVA with use_dora)")
    p.add_argument("--fusion", action="store_true",
                   help="text scenarios: add lava-lora-unfused / lava-unfused rows (shared-input fusion off) beside "
                        "the default rows (fusion on)")
    p.add_argument("--ablation", action="store_true",
                   help="text scenarios: add rows with the linear fast-path changes undone one at a time")
    # sizes (0/None = the scenario's full-size default)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--rank", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--blocks", help="ResNet blocks per stage, e.g. 3,4,6,3 (ResNet-50) or 1,1,1,1")
    p.add_argument("--dtype", choices=["bf16", "fp32"],
                   help="cnn / conv: bf16 autocast (default) or fp32; minilm: bf16 weights (default) or fp32")
    p.add_argument("--backbone", choices=["mobilenet_v2", "craft_vgg16_bn"],
                   help="cpu-conv / conv: the pretrained CNN (default mobilenet_v2)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps, warmup, repeats = DEFAULTS.get(args.scenario, (5, 2, 3))
    steps = args.steps or steps
    warmup = warmup if args.warmup is None else args.warmup
    repeats = args.repeats or repeats
    env = environment(device)
    if argv is not None:
        env["command"] = "python -m benchmarks.run " + " ".join(argv)
    print(f"[{args.scenario}] building variants on {device} ...", flush=True)
    sc = SCENARIOS[args.scenario](args, device)
    run_interleaved(sc.variants, device, steps=steps, warmup=warmup, repeats=repeats,
                    measure_memory=not args.no_memory, log=lambda s: print(s, flush=True))
    memory_method = (
        "resident (params+buffers+optimizer state) + peak of torch.cuda.max_memory_allocated above the level before one step"
        if device.type == "cuda" else
        "resident (params+buffers+optimizer state) + peak of the running total of CPU tensor allocations "
        "recorded by torch.profiler(profile_memory=True) during one untimed step (not RSS)"
    )
    result = {
        "scenario": sc.name,
        "environment": env,
        "setup": sc.setup,
        "timing": f"{repeats} rounds x {steps} timed steps per variant after {warmup} warm-up steps, "
                  "variant order rotated each round; median over all timed steps",
        "memory_method": memory_method if not args.no_memory else "not measured",
        "unit": sc.unit,
        "rows": summarize(sc.variants, sc.unit),
        "notes": sc.notes,
    }
    md_path = args.md_path or (args.json_path[:-5] + ".md" if args.json_path and args.json_path.endswith(".json") else None)
    write_results(result, args.json_path, md_path)
    if md_path:
        print(open(md_path).read())
    else:
        from .harness import to_markdown

        print(to_markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
