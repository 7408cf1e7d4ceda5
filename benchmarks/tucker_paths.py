"""Tucker-2 conv increments on CPU: the three-conv chain vs the weight path, and what "auto" picks.

    python -m benchmarks.tucker_paths --out benchmarks/results

Per case: one conv layer with a LAVA ``factorization="tucker"`` adapter, forward + backward of
``y.sum()`` on a batch, median of 5 timed repetitions after one warm-up, for ``conv_path`` =
``"weight"`` (one conv with ``W0 + ΔW``), ``"separable"`` (the 1×1 → k×k core → 1×1 chain) and
``"auto"`` (the cost model of :func:`lava_peft.methods.tucker_conv.choose_tucker_path`).
Shapes are those of CRAFT VGG16-BN and MobileNetV2 layers at 64 px input, batch 32.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import lava_peft as lp

CASES = [
    ("VGG conv 128→128 3×3, 16×16 px", lambda: nn.Conv2d(128, 128, 3, padding=1), (32, 128, 16, 16), 12),
    ("VGG conv 512→512 3×3, 4×4 px", lambda: nn.Conv2d(512, 512, 3, padding=1), (32, 512, 4, 4), 24),
    ("MobileNetV2 depthwise 144 3×3, 16×16 px", lambda: nn.Conv2d(144, 144, 3, padding=1, groups=144, bias=False),
     (32, 144, 16, 16), 8),
    ("MobileNetV2 1×1 144→24, 16×16 px", lambda: nn.Conv2d(144, 24, 1, bias=False), (32, 144, 16, 16), 8),
]


def time_case(make, shape, r, path, reps=5):
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(make()), lp.LavaConfig(r=r, target_modules="all-conv", factorization="tucker",
                                                          conv_path=path))
    x = torch.randn(*shape)
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        model(x).sum().backward()
        times.append(time.perf_counter() - t)
    adapter = model.adapter_layers()[0][1]
    return statistics.median(times[1:]), adapter.conv_path_for(x, model.model[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=1)
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)
    rows = []
    for label, make, shape, r in CASES:
        t = {p: time_case(make, shape, r, p) for p in ("weight", "separable", "auto")}
        rows.append(f"| {label} | {r} | {1e3 * t['weight'][0]:.0f} | {1e3 * t['separable'][0]:.0f} | "
                    f"{1e3 * t['auto'][0]:.0f} ({t['auto'][1]}) |")
        print(rows[-1], flush=True)
    load = tuple(round(x, 1) for x in __import__("os").getloadavg())
    text = "\n".join([
        "# Tucker-2 conv adapters: three-conv chain vs weight path (CPU)", "",
        f"- command: `python -m benchmarks.tucker_paths {' '.join(sys.argv[1:] if argv is None else argv)}`",
        f"- machine: {platform.machine()}, 2-core CPU shared with other jobs (load average at the end {load}), "
        f"torch {ns.threads} thread(s), fp32",
        f"- versions: lava-peft {lp.__version__}, torch {torch.__version__}, Python {platform.python_version()}", "",
        "Forward + backward of one layer, batch 32, median of 5 (ms). Timings on a loaded shared CPU: compare "
        "within a row only.", "",
        "| layer | r | weight path | chain | auto (its choice) |", "|---|---|---|---|---|", *rows, "",
        "Dense 3×3 convs: the chain is the faster path and `auto` picks it; depthwise convs: the chain "
        "expands every channel into r rank channels (O·r activations), far slower, and `auto` keeps the "
        "weight path; 1×1 convs: the weight path (ΔW is tiny) wins.", ""])
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tucker_paths.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
