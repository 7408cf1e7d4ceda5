"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` (see docs/format.md).

Writes are atomic (temp file in the same directory, then ``os.replace``); nothing is
ever unpickled from an adapter file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import AdapterFileError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, payload: dict) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(cpu, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"no adapter config at {path}; expected the directory written by save_pretrained()")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path} is not valid JSON ({exc}); the file is corrupt or truncated") from None


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"no adapter weights at {path}; expected {WEIGHTS_NAME} next to {CONFIG_NAME}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{path} is corrupt or truncated and cannot be read as safetensors ({exc})") from None


def fingerprint(shapes: dict[str, list[int]]) -> dict:
    """Adapted module names + base weight shapes, and a short hash of both."""
    blob = json.dumps(shapes, sort_keys=True).encode()
    return {"modules": shapes, "sha256": hashlib.sha256(blob).hexdigest()[:16]}


def check_tensors_match(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source, keys=None) -> None:
    """Refuse a weights file whose keys (``keys``, default all of ``tensors``) or shapes differ from ``expected``."""
    present = set(tensors) if keys is None else set(keys)
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    bad_shape = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        raise AdapterFileError(
            f"{source} does not match its config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {bad_shape[:3]}; the file is corrupt or was edited"
        )
