"""Trainable weights, resumable checkpoints and the run-directory marker.

A checkpoint directory ``<run>/checkpoints/step-000120/`` holds

* ``adapter/`` — the adapter as ``save_pretrained`` writes it (safetensors + JSON), or,
  for a plain model, ``model.safetensors`` with its trainable tensors;
* ``trainer_state.json`` — step, epoch, best metric, scheduler state, Python/NumPy RNG, the
  step clocks of DyLoRA/MoSA samplers;
* ``rng_state_rank{r}.safetensors`` — torch (and CUDA) RNG of each rank;
* ``optimizer.pt`` — the AdamW state (``torch.save``; loaded with ``weights_only=True``).

Adapter files never contain pickles; only ``optimizer.pt`` uses torch's format.

Crash safety: a checkpoint is written into ``step-N.tmp/``, every file and folder in it is
fsync'd, and it is renamed to ``step-N/`` in one step; resume takes only complete ``step-N``
folders and warns about ``*.tmp`` leftovers.  ``adapter/`` and ``best/`` are written and read
by :mod:`lava_peft.adapter_files` (one unit each: the previous complete version stays loadable;
read back sha256-verified).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapter_files import FULL_WEIGHTS_NAME, read_adapter_dir, read_weights_dir, write_weights_dir  # noqa: F401 (FULL_WEIGHTS_NAME: re-exported)
from ..errors import LavaError
from ..io import atomic_write_json, fsync_dir, fsync_tree
from ..model import AdaptedModel

RUN_MARKER = "run.json"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
RUN_OUTPUTS = (RUN_MARKER, METRICS_NAME, SUMMARY_NAME, "metrics.png", "adapter", "best", "checkpoints")


class RunDirError(LavaError, FileExistsError):
    """The output directory holds another run (use overwrite / resume) or is not usable."""


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / FSDP-style wrappers."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) and not isinstance(model, AdaptedModel):
        model = model.module
    return model


# ----------------------------------------------------------------------------- weights
def save_trainable(model: nn.Module, directory: str | os.PathLike) -> None:
    """Adapter files (AdaptedModel: ``save_pretrained``) or the trainable tensors of a plain model
    (``model.safetensors``), each written as one unit by :mod:`lava_peft.adapter_files`."""
    model = unwrap(model)
    if isinstance(model, AdaptedModel):
        model.save_pretrained(str(directory), adapter_name=model.active_adapter)
    else:
        write_weights_dir(directory, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad})


@torch.no_grad()
def load_trainable(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy weights saved by :func:`save_trainable` into ``model``'s trainable tensors, in place."""
    model = unwrap(model)
    directory = Path(directory)
    if isinstance(model, AdaptedModel):
        name = model.active_adapter
        files = read_adapter_dir(directory, parse_config=False, load_tensors=False)
        saved = files.payload
        if saved.get("config") != model.peft_config[name].to_dict():
            raise LavaError(
                f"the checkpoint in {directory} was written for another adapter config "
                f"({saved.get('method')}: {saved.get('config')}); resume with the config it was trained with"
            )
        tensors = files.read_tensors()
        if saved.get("layout") in ("peft", "peft-shira"):  # HF PEFT's keys: the model maps and checks them itself
            model.load_adapter_file_tensors(name, tensors)
            return
        state = model.adapter_state_dict(name)
    else:
        tensors = read_weights_dir(directory)
        state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(state):
        missing, extra = sorted(set(state) - set(tensors))[:3], sorted(set(tensors) - set(state))[:3]
        raise LavaError(f"checkpoint {directory} does not fit this model: missing {missing}, unexpected {extra}")
    for key, dst in state.items():
        if dst.shape != tensors[key].shape:
            raise LavaError(f"checkpoint {directory}: {key} has shape {tuple(tensors[key].shape)}, model {tuple(dst.shape)}")
    if isinstance(model, AdaptedModel):
        # through each module's load_state_dict: an adapter whose file tensors are derived from its
        # parameters (low-bit: packed codes) restores them itself, where copying into
        # adapter_state_dict()'s fresh tensors would silently change nothing
        model.load_adapter_tensors(name, tensors)
        return
    for key, dst in state.items():
        dst.copy_(tensors[key])


def sampler_state(model: nn.Module) -> dict[str, int]:
    """The DyLoRA / MoSA sampler clocks of an adapted model (:meth:`AdaptedModel.sampler_state`); ``{}`` otherwise."""
    model = unwrap(model)
    return model.sampler_state() if isinstance(model, AdaptedModel) else {}


def load_sampler_state(model: nn.Module, state: dict[str, int]) -> None:
    model = unwrap(model)
    if isinstance(model, AdaptedModel):
        model.load_sampler_state(state)


# ----------------------------------------------------------------------------- RNG
def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able Python/NumPy state, tensors of torch/CUDA state)."""
    np_state = np.random.get_state()
    py = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    return py, tensors


def set_rng_state(py: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = py["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = py["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


_CHECKPOINT_NAME = re.compile(r"step-(\d+)")


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step; incomplete ``*.tmp`` folders (a save that
    was interrupted) are skipped with a warning."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done, skipped = [], []
    for d in root.iterdir():
        match = _CHECKPOINT_NAME.fullmatch(d.name)
        if match and d.is_dir() and (d / "trainer_state.json").is_file():
            done.append((int(match.group(1)), d))
        elif d.name.startswith("step-") and d.name.endswith(".tmp"):
            skipped.append(d.name)
    latest = max(done)[1] if done else None
    if skipped:
        warnings.warn(
            f"ignoring incomplete checkpoint folder(s) {sorted(skipped)} in {root} (a save was interrupted); "
            + (f"resuming from {latest.name}" if latest else "no complete checkpoint to resume from"),
            stacklevel=2,
        )
    return latest


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise LavaError(
            f"resume_from={str(path)!r} is neither a checkpoint (no trainer_state.json) nor a run directory "
            "with checkpoints/step-*; point it at one, or drop resume_from to start fresh"
        )
    return latest


def save_checkpoint(directory: Path, model, optimizer, scheduler, state: dict, rank: int, world: int, is_main: bool) -> None:
    """Rank 0 writes model/optimizer/state; every rank writes its own RNG. Written to a
    temporary sibling and renamed, so a crash never leaves a half checkpoint."""
    from . import dist

    tmp = directory.with_name(directory.name + ".tmp")
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    py_rng, torch_rng = rng_state()
    save_file({k: v.contiguous() for k, v in torch_rng.items()}, str(tmp / f"rng_state_rank{rank}.safetensors"))
    if is_main:
        save_trainable(model, tmp / "adapter")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        payload = dict(state, scheduler=scheduler.state_dict(), rng=py_rng, world_size=world,
                       sampler_clocks=sampler_state(model))
        atomic_write_json(tmp / "trainer_state.json", _jsonable(payload))
    dist.barrier()
    if is_main:
        fsync_tree(tmp)  # every byte on disk before the rename makes the checkpoint visible
        old = directory.with_name(directory.name + ".old")
        if directory.exists():  # the same step saved again (e.g. after a resume): not a resume candidate meanwhile
            if old.exists():
                shutil.rmtree(old)
            os.replace(directory, old)
        os.replace(tmp, directory)
        fsync_dir(directory.parent)
        if old.exists():
            shutil.rmtree(old)
    dist.barrier()


def load_checkpoint(directory: Path, model, optimizer, scheduler, rank: int) -> dict:
    state = json.loads((directory / "trainer_state.json").read_text())
    load_trainable(model, directory / "adapter")
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(state["scheduler"])
    rng_file = directory / f"rng_state_rank{rank}.safetensors"
    if not rng_file.is_file():
        rng_file = directory / "rng_state_rank0.safetensors"
    set_rng_state(state["rng"], load_file(str(rng_file)))
    load_sampler_state(model, state.get("sampler_clocks", {}))  # DyLoRA / MoSA draw sequences
    return state


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


# ----------------------------------------------------------------------------- run directory
def prepare_run_dir(run_dir: str | os.PathLike, overwrite: bool, resuming: bool) -> Path:
    """Refuse a directory holding another run unless ``overwrite``; with it, remove only the
    files a run writes (never anything else the user keeps there)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output_dir {run_dir} exists and is a file; choose a directory path")
    present = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if present and not resuming:
        if not overwrite:
            raise RunDirError(
                f"output_dir {run_dir} already holds a run ({', '.join(present)}); nothing was changed. "
                "Choose another output dir, pass --overwrite (overwrite=True) to replace it, "
                "or --resume to continue it"
            )
        for name in present:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir
