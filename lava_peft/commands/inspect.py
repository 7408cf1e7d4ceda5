"""`lava inspect`: what an adapter file holds, and diagnostics on the real base model."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LavaError
from .evaluate import _load_trained

def inspect_adapter(path: str) -> dict:
    """Method, targets, per-module parameters and byte counts of the adapter at ``path``."""
    from ..adapter_files import (CONFIG_NAME, WEIGHTS_NAME, lava_key, read_adapter_dir, read_tensor_index,
                                 split_saved_key, tensor_layout)
    from ..train.checkpoint import RUN_MARKER

    p = Path(path)
    if not p.exists():
        raise LavaError(f"{path} does not exist; give an adapter directory, its adapter_model.safetensors, or a run directory")
    if p.is_file():
        weights, directory = p, p.parent
    else:
        directory = p
        if (p / RUN_MARKER).is_file() and not (p / WEIGHTS_NAME).is_file():
            directory = p / "best" if (p / "best" / WEIGHTS_NAME).is_file() else p / "adapter"
        weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise LavaError(f"no {WEIGHTS_NAME} in {directory}; `lava inspect` reads adapters written by save_pretrained()")
    payload = (read_adapter_dir(directory, parse_config=False, load_tensors=False).payload
               if (directory / CONFIG_NAME).is_file() else {})
    modules: dict[str, dict] = {}
    fp_modules = sorted((payload.get("base_model_fingerprint") or {}).get("modules", {}), key=len, reverse=True)
    total_params = tensor_bytes = n_tensors = 0
    metadata, index = read_tensor_index(weights)
    layout = tensor_layout(payload, directory) if payload.get("method") else None
    if layout == "peft":  # HF PEFT key names in the file
        index = {lava_key(k, payload, weights): v for k, v in index.items()}
    elif layout == "peft-shira":  # PEFT's SHiRA keys: base_model.model.<path>.shira_weight / shira_indices
        index = {k.removeprefix("base_model.model."): v for k, v in index.items()}
    for key, (shape, dtype) in index.items():
        numel = 1
        for d in shape:
            numel *= d
        size = numel * _DTYPE_BYTES.get(dtype, 4)
        saved = split_saved_key(key)
        if saved is not None:
            module, param = saved
            kind = "saved"
        else:
            module, param = _split_key(key, fp_modules)
            kind = "adapter"
        entry = modules.setdefault(module, {"kind": kind, "params": 0, "bytes": 0, "tensors": {}})
        entry["params"] += numel
        entry["bytes"] += size
        entry["tensors"][param] = {"shape": shape, "dtype": dtype}
        total_params += numel
        tensor_bytes += size
        n_tensors += 1
    fp = (payload.get("base_model_fingerprint") or {}).get("modules", {})
    for name, shape in fp.items():
        if name in modules:
            modules[name]["base_shape"] = shape
    config = payload.get("config", {})
    return {
        "path": str(directory),
        "method": payload.get("method", metadata.get("method", "unknown")),
        "library_version": payload.get("library_version"),
        "format_version": payload.get("format_version"),
        "config": config,
        "targets": [m for m, e in modules.items() if e["kind"] == "adapter"],
        "modules_to_save": [m for m, e in modules.items() if e["kind"] == "saved"],
        "modules": modules,
        "adapter_params": sum(e["params"] for e in modules.values() if e["kind"] == "adapter"),
        "saved_params": sum(e["params"] for e in modules.values() if e["kind"] == "saved"),
        "total_params": total_params,
        "tensors": n_tensors,
        "tensor_bytes": tensor_bytes,
        "file_bytes": weights.stat().st_size,
        "config_bytes": (directory / CONFIG_NAME).stat().st_size if (directory / CONFIG_NAME).is_file() else 0,
    }


def _split_key(key: str, modules: list[str]) -> tuple[str, str]:
    """``(module path, tensor name)`` of an adapter key, using the adapted module names."""
    for m in modules:  # longest first
        if key.startswith(m + "."):
            return m, key[len(m) + 1 :]
    for marker in (".lava_", ".lora_"):
        if marker in key:
            module, rest = key.split(marker, 1)
            return module, marker[1:] + rest
    module, _, param = key.rpartition(".")
    return module, param


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _add_inspect_arguments(p):
    p.add_argument("path", help="adapter directory, its adapter_model.safetensors, or a run directory")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.add_argument("--all", action="store_true", help="list every module (default: the first 20)")
    p.add_argument("--spectra", metavar="PNG", help="also plot the singular values of every layer's ΔW "
                   "(each unfolding of conv kernels) to this PNG and report numerical ranks; needs the base "
                   "model: a run directory, or --model and --data")
    p.add_argument("--changed", action="store_true", help="also count the base weights that merging the "
                   "adapter would change (needs the base model, like --spectra)")
    p.add_argument("--model", help="base model for --spectra/--changed (default: the one recorded in the run)")
    p.add_argument("--data", help="data set the head was trained for (default: the one recorded in the run)")


def adapter_diagnostics(path: str, model_name: str | None, data: str | None, spectra_png: str | None,
                        changed: bool) -> dict:
    """Diagnostics that need ``ΔW`` on the real base model: spectra (plot + numerical ranks), % changed."""
    from .. import diagnostics
    from ..model import AdaptedModel

    source = Path(path)
    model, _, info, weights = _load_trained(str(source.parent if source.is_file() else source), model_name, data)
    if not isinstance(model, AdaptedModel):
        raise LavaError(f"{weights} holds a full trained model, not an adapter; --spectra and --changed need an adapter")
    out: dict = {"base_model": info["model"]}
    if spectra_png:
        spectra = diagnostics.delta_spectra(model)
        diagnostics.plot_spectra(spectra, spectra_png, title=f"ΔW spectra: {weights}")
        out["spectra_png"] = str(spectra_png)
        out["numerical_ranks"] = {layer: {kind: diagnostics.numerical_rank(sv) for kind, sv in per.items()}
                                  for layer, per in spectra.items()}
    if changed:
        out["merge_changes"] = diagnostics.merged_change_fraction(model)
    return out


def _print_diagnostics(diag: dict) -> None:
    ranks = diag.get("numerical_ranks")
    if ranks:
        kinds: dict[str, list[int]] = {}
        for per in ranks.values():
            for kind, rank in per.items():
                kinds.setdefault(kind, []).append(rank)
        print(f"\nΔW spectra   {diag['spectra_png']}  (numerical rank, σ_i > 1e-6·σ_1, over {len(ranks)} layers)")
        for kind, values in kinds.items():
            values.sort()
            print(f"  {kind:18s} min {values[0]:4d}  median {values[len(values) // 2]:4d}  max {values[-1]:4d}")
    changes = diag.get("merge_changes")
    if changes:
        print(f"\nmerging changes {changes['changed']:,d} base weights: {changes['percent_of_adapted']:.2f}% of the "
              f"adapted layers' weights, {changes['percent_of_model']:.2f}% of all {changes['model_params']:,d} "
              f"base-model parameters")


def cmd_inspect(ns) -> int:
    info = inspect_adapter(ns.path)
    if ns.spectra or ns.changed:
        info["diagnostics"] = adapter_diagnostics(ns.path, ns.model, ns.data, ns.spectra, ns.changed)
    if ns.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = info["config"]
    keys = ("r", "alpha", "orth_lambda", "orth_factors", "init", "target_modules", "modules_to_save", "dropout")
    shown = ", ".join(f"{k}={cfg[k]!r}" for k in keys if k in cfg)
    print(f"adapter      {info['path']}")
    print(f"method       {info['method']}   (lava-peft {info['library_version']}, format {info['format_version']})")
    print(f"config       {shown}")
    print(f"targets      {len(info['targets'])} modules; modules_to_save: {info['modules_to_save'] or 'none'}")
    rows = list(info["modules"].items())
    limit = len(rows) if ns.all else 20
    width = max([len(m) for m, _ in rows[:limit]] + [6])
    print(f"\n  {'module':{width}s}  {'base weight':>16s}  {'params':>10s}  tensors")
    for name, e in rows[:limit]:
        base = "x".join(map(str, e.get("base_shape", []))) or ("(saved)" if e["kind"] == "saved" else "")
        tensors = ", ".join(f"{k} {'x'.join(map(str, t['shape']))}" for k, t in e["tensors"].items())
        print(f"  {name:{width}s}  {base:>16s}  {e['params']:>10,d}  {tensors}")
    if len(rows) > limit:
        print(f"  ... {len(rows) - limit} more (use --all)")
    print(f"\nparameters   {info['total_params']:,d} total = {info['adapter_params']:,d} adapter + "
          f"{info['saved_params']:,d} in modules_to_save, in {info['tensors']} tensors")
    print(f"bytes        {info['tensor_bytes']:,d} of tensor data; adapter_model.safetensors {info['file_bytes']:,d} B, "
          f"adapter_config.json {info['config_bytes']:,d} B")
    if "diagnostics" in info:
        _print_diagnostics(info["diagnostics"])
    return 0
