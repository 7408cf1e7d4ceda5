"""The headline ratios of a results folder: ours vs HF PEFT and vs the frozen backbone, per scenario.

    python -m benchmarks.gpu_summary --results benchmarks/results/gpu-2026-12-07 [--out DIR/gpu-summary.md]

Reads every ``gpu-*.json`` in ``--results`` (``--glob`` to change) and recognises each file by its
shape, as the benchmark scripts write it:

* ``python -m benchmarks.run`` (training steps; keys ``scenario`` and ``rows`` with ``role``): for
  every lava-peft row and the PEFT rows, the throughput ratio to the frozen backbone (``x_frozen``),
  to HF PEFT (``x_peft``) and the peak-memory ratio to PEFT (``mem_x_peft``) — higher ratios are
  faster; failed rows are listed as failed;
* ``benchmarks.mixed_serving`` (key ``workloads``): per workload and adapters-per-batch row, our and
  PEFT's throughput over the same library's single-adapter throughput (``x_single``) and ours over
  PEFT's (``x_peft``);
* ``benchmarks.switching`` (key ``models``): per model and adapter method, our **time** over PEFT's
  (``x_peft``, lower is better) for ``switch`` and ``load+merge``;
* ``benchmarks.load_time`` (key ``max_abs_output_diff_ours_vs_peft``): per adapter count, our load
  **time** over PEFT's (lower is better);
* ``benchmarks.fusion_micro --json`` (key ``cases``): fused over unfused time per sibling group
  (lower is better).

The ratios are copied from the files (each script's own definitions, e.g. medians over interleaved
steps); nothing is re-timed.  Prints a markdown table and writes it to ``--out`` (default
``<results>/gpu-summary.md``).  ``--expect a,b`` lists scenarios whose ``gpu-<name>.json`` must be
there: a missing one is reported (the scenario failed or did not run).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

THROUGHPUT, TIME = "throughput (higher is better)", "time (lower is better)"


def _ratio(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def training_lines(name: str, data: dict) -> list[dict]:
    """``benchmarks.run`` results: one line per PEFT / lava-peft row."""
    lines = []
    for row in data["rows"]:
        if row.get("role") == "frozen":
            continue
        entry = {"scenario": name, "row": row["name"] + (f" [{row['group']}]" if row.get("group") not in (None, "", "eager") else ""),
                 "measure": THROUGHPUT}
        if "error" in row:
            entry["failed"] = row["error"]
        else:
            entry.update(x_frozen=row.get("x_frozen"), x_peft=None if row.get("role") == "peft" else row.get("x_peft"),
                         mem_x_peft=None if row.get("role") == "peft" else row.get("mem_x_peft"))
        lines.append(entry)
    return lines


def mixed_lines(name: str, data: dict) -> list[dict]:
    """``mixed_serving``: every adapters-per-batch row; ``x_frozen`` here is ``× single`` (same library)."""
    lines = []
    for row in data["rows"]:
        if row["row"] == "single":
            continue
        lines.append({"scenario": f"{name} {row['workload']}", "row": f"{row['row']} ({row['library']})",
                      "measure": THROUGHPUT, "x_single": row["x_single"],
                      "x_peft": row["x_peft"] if row["library"] != "peft" else None})
    return lines


def switching_lines(name: str, data: dict) -> list[dict]:
    return [{"scenario": f"{name} {row['model']}", "row": f"{row['operation']} ({row['method']} r={row['rank']})",
             "measure": TIME, "x_peft": row["x_peft"]}
            for row in data["rows"] if row["variant"] == "ours" and row["operation"] in ("switch", "load+merge")]


def load_time_lines(name: str, data: dict) -> list[dict]:
    return [{"scenario": name, "row": f"{row['adapters']} adapters ({row['library']})", "measure": TIME,
             "x_peft": row["x_peft"]}
            for row in data["rows"] if row["library"] != "peft"]


def fusion_lines(name: str, data: dict) -> list[dict]:
    key = data.get("headline", "median_ms")
    return [{"scenario": name, "row": case["case"], "measure": TIME,
             "x_unfused": case["fused"][key] / case["unfused"][key]} for case in data["cases"]]


def headline_lines(name: str, data: dict) -> list[dict]:
    """The summary lines of one result file, chosen by the file's shape."""
    if "scenario" in data:
        return training_lines(name, data)
    if "workloads" in data:
        return mixed_lines(name, data)
    if "models" in data:
        return switching_lines(name, data)
    if "max_abs_output_diff_ours_vs_peft" in data:
        return load_time_lines(name, data)
    if "cases" in data:
        return fusion_lines(name, data)
    raise ValueError(f"{name}: not a result file of benchmarks.run / mixed_serving / switching / load_time / "
                     "fusion_micro (unknown keys " + ", ".join(sorted(data)) + ")")


def summarize_dir(results: str, pattern: str = "gpu-*.json", expect: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """``(lines, missing)``: the headline lines of every matching file, and the expected names without a file."""
    lines, seen = [], set()
    for path in sorted(glob.glob(os.path.join(results, pattern))):
        stem = os.path.basename(path)[:-len(".json")]
        name = stem[len("gpu-"):] if stem.startswith("gpu-") else stem
        seen.add(name)
        with open(path) as fh:
            lines += headline_lines(name, json.load(fh))
    missing = [n for n in (expect or []) if n not in seen]
    return lines, missing


def to_markdown(lines: list[dict], missing: list[str], device: str | None = None) -> str:
    out = ["# GPU benchmarks: headline ratios", ""]
    if device:
        out += [f"- device: {device}"]
    out += ["- training rows: throughput ratios (× frozen, × PEFT; > 1 = faster) and peak memory × PEFT; mixed "
            "serving: × single = throughput over the same library with one adapter; switching / load time / fusion: "
            "time ratios (< 1 = faster). Full tables in the per-scenario markdown files.", "",
            "| scenario | row | measure | × frozen / × single | × PEFT | mem × PEFT | fused / unfused |",
            "|---|---|---|---:|---:|---:|---:|"]
    for e in lines:
        if "failed" in e:
            out.append(f"| {e['scenario']} | {e['row']} | failed: {e['failed'][:100]} | | | | |")
            continue
        first = e.get("x_frozen", e.get("x_single"))
        out.append(f"| {e['scenario']} | {e['row']} | {e['measure']} | {_ratio(first)} | {_ratio(e.get('x_peft'))} | "
                   f"{_ratio(e.get('mem_x_peft'))} | {_ratio(e.get('x_unfused'))} |")
    if missing:
        out += ["", "Missing (failed or not run): " + ", ".join(missing)]
    return "\n".join(out) + "\n"


def _device_of(results: str, pattern: str) -> str | None:
    for path in sorted(glob.glob(os.path.join(results, pattern))):
        with open(path) as fh:
            env = json.load(fh).get("environment", {})
        if env.get("gpu") or env.get("cpu"):
            return f"{env.get('gpu') or env.get('cpu')}; torch {env.get('torch')}, peft {env.get('peft')}"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="folder holding the gpu-<name>.json files")
    ap.add_argument("--glob", default="gpu-*.json", help="which JSON files to read (default gpu-*.json)")
    ap.add_argument("--out", help="markdown path (default <results>/gpu-summary.md)")
    ap.add_argument("--expect", help="comma list of scenario names that must have a gpu-<name>.json")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.results):
        raise SystemExit(f"--results {args.results}: no such folder")
    lines, missing = summarize_dir(args.results, args.glob, args.expect.split(",") if args.expect else None)
    text = to_markdown(lines, missing, _device_of(args.results, args.glob))
    out = args.out or os.path.join(args.results, "gpu-summary.md")
    with open(out + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(out + ".tmp", out)
    sys.stdout.write(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
