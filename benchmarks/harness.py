"""Side-by-side training-step benchmark harness (one process, interleaved, repeated).

A scenario is a list of :class:`Variant` objects (frozen backbone, HF PEFT, lava-peft, ...)
that all live in the same process.  :func:`run_interleaved` times them step by step: a
*round* is ``steps`` passes, and in each pass every variant runs one timed training
step, in an order that rotates from pass to pass.  So bursts of load from other
processes on a shared CPU (or GPU clock changes) hit every variant alike, and the
``k``-th steps of two variants, taken seconds apart, form a *pair*.  Reported per variant:

* ``step_ms`` — the median over all timed steps of all rounds (``iqr_ms`` the spread);
* ``throughput`` — ``units_per_step / median step time`` (tokens/s or images/s);
* ``x_frozen`` / ``x_peft`` — throughput ratios to the frozen backbone / to HF PEFT
  from the overall medians; ``x_frozen_paired`` the median over all pairs of the
  per-pair ratio (robust to load that changes during the run), with its range;
* ``step_ms_p20`` — the 20th percentile of the step times (load from other processes
  only ever adds time, so the low quantile estimates the unloaded machine);
* ``peak_mem_gib`` — ``resident + step peak``: bytes of the variant's own parameters,
  buffers and optimizer state, plus the peak of bytes allocated *during* one training
  step above what was allocated before it.  On CUDA the step peak is
  ``torch.cuda.max_memory_allocated() − memory_allocated()`` around one step; on CPU it
  is the maximum of the running total of allocations recorded by the torch profiler
  (``profile_memory=True``: every tensor allocation/free by the CPU allocator) during one
  untimed step.  Both count exactly the tensors of that variant, even with the other
  variants resident in the same process.

A training step is ``forward → loss (+ regularizer) → backward → optimizer.step →
zero_grad(set_to_none=True)``.  The frozen backbone has no trainable parameters; its
inputs (or input embeddings) require grad so that the full backward runs.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Variant:
    """One row of a scenario.

    ``step_fn(batch) -> loss`` runs forward and returns the scalar loss; the harness does
    backward and the optimizer step.  ``make_batch()`` returns a fresh batch (on device).
    """

    name: str
    module: nn.Module
    step_fn: Callable[[Any], torch.Tensor]
    make_batch: Callable[[], Any]
    units_per_step: int
    role: str = "lava"  # "frozen" | "peft" | "lava" | "other"
    group: str = ""  # ratios are taken to the frozen / PEFT rows of the same group (e.g. "eager", "compiled")
    peft_ref: str | None = None  # name of the PEFT row to compare with (default: the group's first PEFT row)
    notes: str = ""
    lr: float = 1e-4
    optimizer: torch.optim.Optimizer | None = None
    trainable: int = 0
    times: list[list[float]] = field(default_factory=list)  # per round
    peak_step_bytes: int | None = None
    resident_bytes: int | None = None
    error: str | None = None

    def setup(self) -> None:
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=self.lr) if params else None


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA); a no-op on the CPU.  Put around every timed region."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """``(wall seconds, result)`` of ``fn()``, synchronising the device before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` since the last :func:`reset_peak_memory`, in GiB; None on the CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 4)


def train_step(v: Variant, batch, device: torch.device) -> None:
    loss = v.step_fn(batch)
    loss.backward()
    if v.optimizer is not None:
        v.optimizer.step()
        v.optimizer.zero_grad(set_to_none=True)


def timed_step(v: Variant, device: torch.device) -> float:
    batch = v.make_batch()
    sync(device)
    t0 = time.perf_counter()
    train_step(v, batch, device)
    sync(device)
    return time.perf_counter() - t0


def resident_bytes(v: Variant) -> int:
    """Bytes of the variant's parameters, buffers and optimizer state (unique storages)."""
    seen, total = set(), 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            nbytes = t.untyped_storage().nbytes()
        except Exception:  # noqa: BLE001 - tensor subclasses (quantized weights) without plain storage
            key, nbytes = id(t), t.numel() * t.element_size()
        if key in seen:
            return
        seen.add(key)
        total += nbytes

    for p in v.module.parameters():
        add(p)
        # quantized parameters (e.g. bitsandbytes Params4bit) keep their state beside the data
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for attr in ("absmax", "code"):
                add(getattr(qs, attr, None))
    for b in v.module.buffers():
        add(b)
    if v.optimizer is not None:
        for state in v.optimizer.state.values():
            for t in state.values():
                add(t)
    return total


def measure_step_peak(v: Variant, device: torch.device) -> int:
    """Peak bytes allocated during one (untimed) training step above the level before it."""
    batch = v.make_batch()
    gc.collect()
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(v, batch, device)
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(v, batch, device)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    mem = sorted(
        (e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0),
        key=lambda e: e["ts"],
    )
    running = peak = 0
    for e in mem:
        running += int(e["args"]["Bytes"])
        peak = max(peak, running)
    return int(peak)


def run_interleaved(
    variants: list[Variant],
    device: torch.device,
    steps: int,
    warmup: int,
    repeats: int,
    measure_memory: bool = True,
    log: Callable[[str], None] = print,
) -> None:
    """Warm up every variant, then ``repeats`` rounds of ``steps`` timed steps each, rotating the order."""
    for v in variants:
        v.setup()
    live = list(variants)
    for v in list(live):
        try:
            t0 = time.perf_counter()
            for _ in range(warmup):
                timed_step(v, device)
            log(f"  warmup {v.name}: {warmup} steps in {time.perf_counter() - t0:.1f}s")
        except Exception as exc:  # noqa: BLE001 - one broken row must not lose the others
            v.error = f"{type(exc).__name__}: {exc}"[:500]
            log(f"  {v.name} FAILED in warmup: {v.error}")
            live.remove(v)
    for rnd in range(repeats):
        for v in live:
            v.times.append([])
        for k in range(steps):
            shift = (rnd * steps + k) % max(len(live), 1)
            for v in live[shift:] + live[:shift]:
                if v.error:
                    continue
                try:
                    v.times[rnd].append(timed_step(v, device))
                except Exception as exc:  # noqa: BLE001
                    v.error = f"{type(exc).__name__}: {exc}"[:500]
                    log(f"  {v.name} FAILED: {v.error}")
        log(f"  round {rnd + 1}/{repeats}: " + ", ".join(
            f"{v.name} {1e3 * statistics.median(v.times[rnd]):.1f} ms" for v in live if v.times[rnd]))
    if measure_memory:
        for v in live:
            if v.error:
                continue
            try:
                v.peak_step_bytes = measure_step_peak(v, device)
            except Exception as exc:  # noqa: BLE001
                log(f"  memory measurement of {v.name} failed: {exc}")
            v.resident_bytes = resident_bytes(v)


# --------------------------------------------------------------------------- results
def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(variants: list[Variant], unit: str) -> list[dict]:
    rows = []
    refs: dict[tuple[str, str], Variant] = {}
    for v in variants:
        if v.times and v.role in ("frozen", "peft") and (v.group, v.role) not in refs:
            refs[(v.group, v.role)] = v
    for v in variants:
        row: dict[str, Any] = {"name": v.name, "role": v.role, "group": v.group, "notes": v.notes,
                               "trainable_params": v.trainable}
        by_role = {role: ref for (group, role), ref in refs.items() if group == v.group}
        named = {u.name: u for u in variants}
        if v.peft_ref in named and named[v.peft_ref].times:
            by_role["peft"] = named[v.peft_ref]
        if v.error or not v.times:
            row["error"] = v.error or "not run"
            rows.append(row)
            continue
        flat = [t for r in v.times for t in r]
        med = statistics.median(flat)
        row.update(
            step_ms=round(1e3 * med, 3),
            iqr_ms=round(1e3 * (_quantile(flat, 0.75) - _quantile(flat, 0.25)), 3),
            step_ms_p20=round(1e3 * _quantile(flat, 0.2), 3),
            round_medians_ms=[round(1e3 * statistics.median(r), 3) for r in v.times],
            n_steps=len(flat),
            throughput=round(v.units_per_step / med, 2),
            unit=f"{unit}/s",
        )
        if v.peak_step_bytes is not None and v.resident_bytes is not None:
            row["resident_gib"] = round(v.resident_bytes / 2**30, 4)
            row["step_peak_gib"] = round(v.peak_step_bytes / 2**30, 4)
            row["peak_mem_gib"] = round((v.resident_bytes + v.peak_step_bytes) / 2**30, 4)
        for role, ref in by_role.items():
            if ref is v or not ref.times:
                continue
            ref_med = statistics.median([t for r in ref.times for t in r])
            row[f"x_{role}"] = round(ref_med / med, 4)
            row[f"x_{role}_p20"] = round(_quantile([t for r in ref.times for t in r], 0.2) / _quantile(flat, 0.2), 4)
            paired = [a / b for ra, rb in zip(ref.times, v.times) for a, b in zip(ra, rb)]
            row[f"x_{role}_paired"] = round(statistics.median(paired), 4)
            row[f"x_{role}_paired_range"] = [round(min(paired), 4), round(max(paired), 4)]
            if ref.peak_step_bytes is not None and v.peak_step_bytes is not None and ref.resident_bytes:
                ref_mem = ref.resident_bytes + ref.peak_step_bytes
                row[f"mem_x_{role}"] = round((v.resident_bytes + v.peak_step_bytes) / ref_mem, 4)
        rows.append(row)
    return rows


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_rev() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def environment(device: torch.device) -> dict:
    def version(mod: str) -> str | None:
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001
            return None

    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": version("peft"),
        "transformers": version("transformers"),
        "lava_peft": version("lava_peft"),
        "git": _git_rev(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return env


def gpu_lines(env: dict) -> list[str]:
    """Markdown bullet naming the GPU of a result's environment record (none for a CPU run)."""
    if not env.get("gpu"):
        return []
    return [f"- GPU: {env['gpu']} ({env.get('gpu_memory_gib')} GiB), CUDA {env.get('cuda')}"]


def serving_header_lines(env: dict) -> list[str]:
    """The date, command, machine (with the load average at start and end), versions and GPU bullets
    that head the markdown of the serving benchmarks (switching, load time, mixed batches)."""
    return [
        f"- date (UTC): {env['date_utc']}",
        f"- command: `{env['command']}`",
        f"- machine: {env['cpu']}, {env['cpu_count']} cores, torch threads {env['torch_threads']}; "
        f"load average start/end {env.get('loadavg_start')} / {env.get('loadavg_end')}",
        f"- versions: python {env['python']}, torch {env['torch']}, peft {env['peft']}, transformers "
        f"{env['transformers']}, lava-peft {env['lava_peft']} (git {env['git']})",
        *gpu_lines(env),
    ]


def record_load_end(env: dict) -> None:
    """Store the load average at the end of a run as ``env["loadavg_end"]`` (where the OS reports one)."""
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]


def results_path(stem: str, device: torch.device, ext: str) -> str:
    """Default output path: ``benchmarks/results/<stem>.<ext>`` on the CPU, ``gpu-<stem>.<ext>`` on CUDA
    (so a GPU run never overwrites the committed CPU results)."""
    prefix = "gpu-" if device.type == "cuda" else ""
    return os.path.join("benchmarks", "results", f"{prefix}{stem}.{ext}")


def to_markdown(result: dict) -> str:
    env, rows = result["environment"], result["rows"]
    unit = next((r["unit"] for r in rows if "unit" in r), "units/s")
    lines = [
        f"# Benchmark `{result['scenario']}`",
        "",
        f"- date (UTC): {env['date_utc']}",
        f"- command: `{env['command']}`",
        f"- device: {env.get('gpu', env['cpu'])} ({env['device']}); CPU: {env['cpu']}, {env['cpu_count']} cores, "
        f"torch threads {env['torch_threads']}",
        f"- torch {env['torch']}, peft {env['peft']}, transformers {env['transformers']}, lava-peft {env['lava_peft']} "
        f"(git {env['git']})",
        f"- load average at start/end: {env.get('loadavg_start')} / {env.get('loadavg_end')}",
        f"- setup: {result['setup']}",
        f"- timing: {result['timing']}",
        f"- memory: {result['memory_method']}",
        "",
        f"| variant | step ms (median) | p20 ms | IQR ms | {unit} | × frozen | × frozen (paired, range) | × frozen (p20) "
        "| × PEFT | peak mem MiB | mem × frozen | trainable |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} |" + " |" * 11)
            continue
        pr = r.get("x_frozen_paired_range")
        paired = f"{r['x_frozen_paired']:.3f} ({pr[0]:.3f}–{pr[1]:.3f})" if pr else "—"
        xf = r.get("x_frozen", 1.0 if r["role"] == "frozen" else None)
        xp = r.get("x_peft", 1.0 if r["role"] == "peft" else None)
        mem = r.get("peak_mem_gib")
        memx = r.get("mem_x_frozen", 1.0 if r["role"] == "frozen" and mem is not None else None)
        cells = [
            r["name"],
            f"{r['step_ms']:.1f}",
            f"{r['step_ms_p20']:.1f}",
            f"{r['iqr_ms']:.1f}",
            f"{r['throughput']:,.0f}",
            f"{xf:.3f}" if xf is not None else "—",
            paired,
            f"{r['x_frozen_p20']:.3f}" if "x_frozen_p20" in r else ("1.000" if r["role"] == "frozen" else "—"),
            f"{xp:.3f}" if xp is not None else "—",
            f"{mem * 1024:,.1f}" if mem is not None else "—",
            f"{memx:.3f}" if memx is not None else "—",
        ]
        lines.append("| " + " | ".join(cells) + " | ")
        lines[-1] += f"{r['trainable_params']:,d} |"
    lines.append("")
    for r in rows:
        if r.get("notes"):
            lines.append(f"- `{r['name']}`: {r['notes']}")
    if result.get("notes"):
        lines += ["", *result["notes"]]
    return "\n".join(lines) + "\n"


def write_texts(outputs) -> None:
    """Write each ``(path, text)`` (``path`` None: skipped) through a temp file and a rename."""
    for path, text in outputs:
        if not path:
            continue
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)


def benchmark_device(args, stem: str | None = None) -> torch.device:
    """``torch.device(args.device)``, refused when CUDA is asked for and absent; with ``stem``, fills
    ``args.json`` / ``args.md`` with the defaults of :func:`results_path` (``.md`` beside ``--json``)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    if stem is not None:
        args.json = args.json or results_path(stem, device, "json")
        args.md = args.md or (args.json[:-5] + ".md" if args.json.endswith(".json") else results_path(stem, device, "md"))
    return device


def write_json_and_markdown(result: dict, json_path: str, md_path: str, render: Callable[[dict], str]) -> None:
    """Write ``result`` as JSON and ``render(result)`` as markdown (atomically) and say where."""
    write_texts(((json_path, json.dumps(result, indent=1) + "\n"), (md_path, render(result))))
    print(f"wrote {json_path} and {md_path}")


def write_results(result: dict, json_path: str | None, md_path: str | None) -> None:
    record_load_end(result["environment"])
    write_texts(((json_path, json.dumps(result, indent=1) + "\n"), (md_path, to_markdown(result) if md_path else "")))
