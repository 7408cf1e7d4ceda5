"""Metrics as JSON lines: one object per line, ``{"split": "train"|"eval", "step": ..., ...}``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLogger:
    """Appends records to ``<run>/metrics.jsonl`` (flushed per line, so a crash keeps them)."""

    def __init__(self, path: str | os.PathLike | None, enabled: bool = True):
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and path is not None
        self.records: list[dict] = []

    def truncate_after(self, step: int) -> None:
        """On resume: keep only what was logged up to the checkpoint's step."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.records.append(record)
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics file (or of ``<run dir>/metrics.jsonl``); clear error if absent."""
    from ..errors import LavaError

    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise LavaError(f"no metrics file at {path}; give a run directory written by `lava train` or its metrics.jsonl")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise LavaError(f"{path}:{i} is not a JSON line ({exc}); the file is corrupt") from None
    return records
