"""Per-seed table of chosen evidence runs, with paired differences to LoRA and to default LAVA.

    python -m benchmarks.quality.evidence_seeds --suite mobilenet --n-train 800 --image-size 64 \\
        --variants lora,lava,lava_initlora,lava_vstep,lora@1e-3

A variant is ``name`` (at lr 3e-3) or ``name@lr``.  The baselines of the paired columns are
LoRA and default LAVA at lr 3e-3 on the same seed.  A run that diverged is marked ``†``: its
training loss spiked above ``--spike`` (it starts near ln 10 ≈ 2.30 on these 10-class tasks) and
its held-out accuracy ended below ``--collapse`` percent; the mean ± std include it.
Prints a Markdown table (the records are ``benchmarks/results/evidence.runs.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from .evidence_variants import LABELS


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def _diff(d: list[float]) -> tuple[str, str]:
    if not d:
        return "–", "–"
    spread = f" ± {statistics.stdev(d):.1f}" if len(d) > 1 else ""
    return f"{statistics.mean(d):+.1f}{spread}", f"{sum(x > 0 for x in d)}/{len(d)}"


def table(runs: list[dict], suite: str, n_train: int, image_size: int, variants: list[str], collapse: float,
          spike: float) -> str:
    sel = [r for r in runs if r["suite"] == suite and r["phase"] == "test" and r["settings"]["n_train"] == n_train
           and r["settings"]["image_size"] == image_size]

    def accs(v: str, lr: float) -> dict[int, float]:
        return {r["seed"]: 100 * r["accuracy"] for r in sel if r["variant"] == v and math.isclose(r["lr"], lr)}

    def diverged(v: str, lr: float, seed: int) -> bool:
        r = next(r for r in sel if (r["variant"], r["seed"]) == (v, seed) and math.isclose(r["lr"], lr))
        return max(r["losses"]) > spike and 100 * r["accuracy"] < collapse

    lora, lava = accs("lora", 3e-3), accs("lava", 3e-3)
    seeds = sorted({r["seed"] for r in sel})
    lines = ["| variant | lr | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean ± std | Δ vs LoRA | wins | Δ vs default LAVA | wins |",
             "|---|---|" + "---|" * len(seeds) + "---|---|---|---|---|"]
    for item in variants:
        name, _, lr_text = item.partition("@")
        lr = float(lr_text) if lr_text else 3e-3
        a = accs(name, lr)
        if not a:
            continue
        cells = [("–" if s not in a else f"{a[s]:.1f}" + ("†" if diverged(name, lr, s) else "")) for s in seeds]
        is_lora, is_lava = name == "lora" and lr == 3e-3, name == "lava" and lr == 3e-3
        d1 = _diff([] if is_lora else [a[s] - lora[s] for s in a if s in lora])
        d2 = _diff([] if is_lava else [a[s] - lava[s] for s in a if s in lava])
        mean = _ms(list(a.values())) + f" ({len(a)})"
        lines.append(f"| {LABELS.get(name, name)} | {lr:g} | " + " | ".join(cells)
                     + f" | **{mean}** | {d1[0]} | {d1[1]} | {d2[0]} | {d2[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", required=True)
    ap.add_argument("--n-train", type=int, required=True)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--variants", required=True)
    ap.add_argument("--collapse", type=float, default=50.0, help="accuracy %% below which a diverged run is marked †")
    ap.add_argument("--spike", type=float, default=2.45, help="training loss above which a run counts as diverging")
    ap.add_argument("--runs", default="benchmarks/results/evidence.runs.jsonl")
    ns = ap.parse_args(argv)
    runs = [json.loads(x) for x in Path(ns.runs).read_text().splitlines() if x.strip()]
    print(table(runs, ns.suite, ns.n_train, ns.image_size, ns.variants.split(","), ns.collapse, ns.spike))
    return 0


if __name__ == "__main__":
    sys.exit(main())
