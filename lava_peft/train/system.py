"""How many CPU threads torch should use here and now."""

from __future__ import annotations

import os
import time


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields[:8])


def idle_cpus(sample_seconds: float = 0.5) -> float | None:
    """Idle CPUs over a short sample (Linux ``/proc/stat``), or None where unknown."""
    a = _cpu_times()
    if a is None:
        return None
    time.sleep(sample_seconds)
    b = _cpu_times()
    if b is None or b[1] == a[1]:
        return None
    return (os.cpu_count() or 1) * (b[0] - a[0]) / (b[1] - a[1])


def pick_num_threads(max_threads: int | None = None) -> tuple[int, str]:
    """Threads for ``torch.set_num_threads``: the idle cores (at least 1).

    On a dedicated machine that is every core.  When other jobs keep cores busy, more
    threads than idle cores make every GEMM wait for descheduled threads; on a 2-core
    machine shared with one busy job, 1 thread ran our test suite 4x faster than 2.
    ``LAVA_NUM_THREADS`` overrides.  Returns (threads, reason).
    """
    cores = os.cpu_count() or 1
    if max_threads:
        cores = min(cores, max_threads)
    env = os.environ.get("LAVA_NUM_THREADS")
    if env:
        return max(1, int(env)), "LAVA_NUM_THREADS"
    idle = idle_cpus()
    if idle is None:
        return cores, f"{cores} cores"
    threads = max(1, min(cores, int(idle + 0.35)))
    return threads, f"{idle:.1f} of {os.cpu_count()} cores idle"


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast is
    about 2x faster than fp32 for transformer matmuls (measured: MiniLM-L6 fwd+bwd 0.37 s vs
    0.87 s per batch of 16 on one EPYC core).  Without it bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False
