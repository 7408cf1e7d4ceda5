"""The ``lava`` command: train, evaluate, merge, inspect and plot adapters.

    lava train --model minilm --data rotten_tomatoes --method lava --rank 8 --out runs/rt
    lava train --config my_run.yaml            (keys = the long option names)
    lava eval runs/rt                          (accuracy of the best/final adapter)
    lava merge runs/rt/adapter --out merged/   (a plain model with the adapter folded in)
    lava inspect runs/rt/adapter               (method, targets, parameter and byte counts)
    lava plot runs/rt                          (loss/accuracy curves as a PNG)

Subcommands live in a registry (:func:`register_command`); another module adds one with
``register_command("bench", help=..., add_arguments=..., run=...)`` and is imported by
listing it in :data:`PLUGIN_MODULES`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .commands.user_train import USER_FLAG_OPTIONS, USER_TRAIN_OPTIONS, train_on_user_data, wants_user_data
from .errors import LavaConfigError, LavaError

PLUGIN_MODULES = ["lava_peft.bench.cli"]
"""Modules imported (if they exist) before parsing; each may call :func:`register_command`."""


@dataclass
class Command:
    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str, add_arguments, run, description: str | None = None) -> None:
    """Add a ``lava <name>`` subcommand (``run(args)`` returns an exit code or None)."""
    COMMANDS[name] = Command(name, help, description or help, add_arguments, run)


# ============================================================================ train options
# name -> (default, type, help).  A YAML/JSON config file uses the same names.
TRAIN_OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "model": ("minilm", str, "model name (minilm, mobilenet_v2, craft_vgg16_bn, small_cnn) or a Hugging Face model directory"),
    "data": ("rotten_tomatoes", str, "data set: rotten_tomatoes (text), fashion_mnist or digits (images)"),
    "method": ("lava", str, "lava | lora | shira | sft | dylora | lowbit | mosa (adapters), head (train only "
                            "the new head) | full (fine-tune everything)"),
    "rank": (8, int, "adapter rank r (number of rank-1 components; shira/sft: a budget of r·(O+I) entries "
                     "per layer unless --density is given; dylora: the largest rank)"),
    "alpha": (16.0, float, "adapter scale numerator: the increment is multiplied by alpha/rank "
                           "(shira/sft: alpha/16 is used as the plain scale of the sparse values)"),
    "density": (None, float, "shira/sft: fraction of each targeted weight that is trained (default: "
                             "shira r·(O+I) entries, sft 0.01)"),
    "mask": (None, str, "shira: mask type random | struct | weight_magnitude | grad | snip (default random)"),
    "bits": (1, int, "lowbit: bits per adapter weight (1..8)"),
    "r_min": (1, int, "dylora: the smallest rank trained"),
    "n_modules": (4, int, "mosa: number of sparse modules the adapter is split into"),
    "sft_phase1_epochs": (1.0, float, "sft: epochs of dense phase-1 training that pick the lottery-ticket mask"),
    "l1_lambda": (0.0, float, "sft: weight of the L1 pull of the sparse difference toward the pretrained weights"),
    "targets": (None, str, "modules to adapt: comma-separated names/suffixes (query,value), a regex, "
                           "'all-linear' or 'all-conv' (default: query,value for text, all-conv for images)"),
    "orth_lambda": (0.1, float, "LAVA orthogonality regularizer weight (0 disables it)"),
    "out": (None, str, "run directory for metrics, checkpoints and the adapter (required)"),
    "epochs": (3.0, float, "passes over the training data"),
    "max_steps": (None, int, "stop after this many optimizer steps (overrides --epochs)"),
    "lr": (None, float, "learning rate of the adapter (default 1e-3; 2e-2 for shira and sft, which update "
                        "weight entries directly: chosen on a validation split, benchmarks/results/methods.md)"),
    "head_lr": (None, float, "learning rate of the new head (default: --lr)"),
    "weight_decay": (0.0, float, "AdamW weight decay of the adapter"),
    "batch_size": (32, int, "samples per optimizer step and process (before --grad-accum)"),
    "grad_accum": (1, int, "gradient accumulation steps"),
    "schedule": ("linear", str, "learning-rate schedule: linear | cosine | constant"),
    "warmup_ratio": (0.06, float, "fraction of the steps used for linear warmup"),
    "eval_every": (None, int, "evaluate every N steps (default: every epoch)"),
    "n_train": (2000, int, "training examples to use (0: all)"),
    "n_eval": (1000, int, "held-out examples to evaluate on (0: all)"),
    "max_len": (64, int, "text: maximum tokens per example"),
    "image_size": (64, int, "images: resize to this many pixels per side"),
    "mixed_precision": ("auto", str, "auto (bf16/fp16 on CUDA, fp32 on CPU) | no | bf16 | fp16; bf16 is ~2x "
                                     "faster on CPUs with native bf16 (AVX512-BF16/AMX)"),
    "seed": (0, int, "random seed (adapter init, data order, data subset)"),
    "threads": (None, int, "CPU threads for torch (default: the cores that are idle right now, at least 1)"),
}
FLAG_OPTIONS = {
    "overwrite": "replace the run already in --out (only the files a run writes are removed)",
    "resume": "continue the run in --out from its latest checkpoint",
    "no_progress": "no progress bars",
}
TRAIN_OPTIONS.update(USER_TRAIN_OPTIONS)  # your own data / --task causal-lm (commands/user_train.py)
FLAG_OPTIONS.update(USER_FLAG_OPTIONS)
ADAPTER_METHODS = ("lava", "lora", "shira", "sft", "dylora", "lowbit", "mosa")
METHODS = (*ADAPTER_METHODS, "head", "full")
DEFAULT_LR, SPARSE_DEFAULT_LR = 1e-3, 2e-2


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file with any of the options below "
                   "(keys as the option names, e.g. batch_size: 16); command-line flags win")
    for name, (default, typ, help_) in TRAIN_OPTIONS.items():
        shown = "" if default is None else f" (default: {default})"
        p.add_argument(_flag(name), dest=name, type=typ, default=argparse.SUPPRESS, help=help_ + shown,
                       metavar=name.upper())
    for name, help_ in FLAG_OPTIONS.items():
        p.add_argument(_flag(name), dest=name, action="store_true", default=argparse.SUPPRESS, help=help_)


def read_config_file(path: str) -> dict:
    """A YAML/JSON mapping of train options; unknown keys are errors that suggest the right name."""
    file = Path(path)
    if not file.is_file():
        raise LavaConfigError(f"config file {path!r} does not exist")
    text = file.read_text()
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            try:
                import yaml
            except ImportError:
                raise LavaConfigError(f"reading {path} needs PyYAML: pip install 'pyyaml>=6' (or write the config as JSON)") from None
            data = yaml.safe_load(text)
    except LavaConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - report any parse error the same way
        raise LavaConfigError(f"config file {path} could not be parsed: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LavaConfigError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    known = set(TRAIN_OPTIONS) | set(FLAG_OPTIONS)
    out, unknown = {}, []
    for key, value in data.items():
        norm = str(key).replace("-", "_")
        if norm not in known:
            close = difflib.get_close_matches(norm, known, 1)
            unknown.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        if norm in TRAIN_OPTIONS and value is not None:
            typ = TRAIN_OPTIONS[norm][1]
            if norm == "targets" and isinstance(value, list):
                value = ",".join(map(str, value))
            try:
                value = typ(value)
            except (TypeError, ValueError):
                raise LavaConfigError(f"config file {path}: {key} must be {typ.__name__}, got {value!r}") from None
        out[norm] = value
    if unknown:
        raise LavaConfigError(f"config file {path} has unknown key(s) {', '.join(unknown)}; "
                              f"valid keys: {', '.join(sorted(known))}")
    return out


def resolve_train_options(ns: argparse.Namespace) -> dict:
    opts = {name: default for name, (default, _, _) in TRAIN_OPTIONS.items()}
    opts.update({name: False for name in FLAG_OPTIONS})
    if getattr(ns, "config", None):
        opts.update(read_config_file(ns.config))
    opts.update({k: v for k, v in vars(ns).items() if k in opts})
    if not opts["out"]:
        raise LavaConfigError("no output directory: pass --out DIR (or 'out:' in the config file)")
    if opts["method"] not in METHODS:
        raise LavaConfigError(f"--method must be one of {METHODS}; got {opts['method']!r}")
    if opts["lr"] is None:
        opts["lr"] = SPARSE_DEFAULT_LR if opts["method"] in ("shira", "sft") else DEFAULT_LR
    return opts


def _parse_targets(targets: str | None, default):
    if targets is None:
        return default
    targets = targets.strip()
    if targets in ("all-linear", "all-conv", "all"):
        return targets
    if "," in targets or targets.replace("_", "").replace(".", "").isalnum():
        return [t.strip() for t in targets.split(",") if t.strip()]
    return targets  # a regular expression


def _check_out_dir(out: str, overwrite: bool, resume: bool) -> None:
    from .train.checkpoint import RUN_OUTPUTS, RunDirError

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {out} is a file; give a directory")
    present = [n for n in RUN_OUTPUTS if (path / n).exists()]
    if present and not (overwrite or resume):
        raise RunDirError(f"--out {out} already holds a run ({', '.join(present)}); nothing was changed. "
                          "Pass --overwrite to replace it, --resume to continue it, or choose another --out")
    if resume and not (path / "checkpoints").is_dir():
        raise RunDirError(f"--resume: {out} has no checkpoints to resume from")


def build_model_for(opts: dict, task):
    """Apply ``--method`` to the task's model; returns the model to train."""
    import lava_peft as lp

    model = task.model
    if opts["method"] in ("head", "full"):
        for p in model.parameters():
            p.requires_grad_(opts["method"] == "full")
        if opts["method"] == "head":
            for name in task.heads:
                for p in model.get_submodule(name).parameters():
                    p.requires_grad_(True)
        return model
    targets = _parse_targets(opts["targets"], task.default_targets)
    return lp.adapt(model, adapter_config_for(opts, targets, task))


def _calibration_batches(data: dict, batch_size: int, n_batches: int = 4) -> list[dict]:
    """The first ``n_batches`` training batches (for gradient-based masks)."""
    n = len(data["labels"])
    return [{k: v[i:i + batch_size] for k, v in data.items()} for i in range(0, min(n, n_batches * batch_size), batch_size)]


def _calibration_loss(model, batch):
    from .train.trainer import classification_loss, default_forward

    return classification_loss(default_forward(model, batch), batch["labels"])


def adapter_config_for(opts: dict, targets, task):
    """The adapter config that ``--method`` and its options describe (sft: runs phase 1 to pick the mask)."""
    import lava_peft as lp

    method = opts["method"]
    common = dict(r=opts["rank"], alpha=opts["alpha"], target_modules=targets, modules_to_save=task.heads)
    if method == "lava":
        return lp.LavaConfig(orth_lambda=opts["orth_lambda"], **common)
    if method == "lora":
        return lp.LoraConfig(**common)
    if method == "dylora":
        return lp.DyLoraConfig(r_min=opts["r_min"], factorization="lava", orth_lambda=opts["orth_lambda"],
                               seed=opts["seed"], **common)
    if method == "lowbit":
        return lp.LowBitConfig(bits=opts["bits"], **common)
    if method == "mosa":
        return lp.MosaConfig(n_modules=opts["n_modules"], seed=opts["seed"], **common)
    sparse = dict(common, alpha=opts["alpha"] / 16.0, seed=opts["seed"])
    if method == "shira":
        config = lp.ShiraConfig(density=opts["density"], mask_type=opts["mask"] or "random", **sparse)
        if config.mask_type in ("random", "struct"):
            return config
        from .methods.shira import with_masks  # |W|, grad, snip: read the model (and calibration batches)

        return with_masks(task.model, config, _calibration_batches(task.train, opts["batch_size"]), _calibration_loss)
    # sft: phase 1 trains the targeted weights densely, the mask keeps the largest changes
    from .methods.sft import lottery_ticket_masks, trainer_phase
    from .train import TrainingArguments

    config = lp.SftConfig(density=opts["density"] or 0.01, l1_lambda=opts["l1_lambda"], **sparse)
    phase1 = TrainingArguments(output_dir=str(Path(opts["out"]) / "sft-phase1"), epochs=opts["sft_phase1_epochs"],
                               batch_size=opts["batch_size"], lr=opts["lr"], seed=opts["seed"], overwrite=True,
                               progress=not opts["no_progress"], summary=False, save_final=False, save_best=False,
                               save_every=0)
    print(f"lava train: LT-SFT phase 1 ({opts['sft_phase1_epochs']} epoch(s) of dense training) ...", flush=True)
    masks = lottery_ticket_masks(task.model, config, trainer_phase(task.train, phase1))
    return config.replace(masks=masks)


def cmd_train(ns: argparse.Namespace) -> int:
    opts = resolve_train_options(ns)
    from .train.tasks import build_task, model_kind

    model_kind(opts["model"])  # fail fast on a bad model name/path, before anything is loaded
    _check_out_dir(opts["out"], opts["overwrite"], opts["resume"])
    import torch

    from .train import Trainer, TrainingArguments, plot_metrics, set_seed

    from .train.system import pick_num_threads

    threads, why = (opts["threads"], "--threads") if opts["threads"] else pick_num_threads()
    torch.set_num_threads(threads)
    print(f"lava train: {threads} CPU thread(s) ({why})", flush=True)
    set_seed(opts["seed"])
    if wants_user_data(opts):  # --data PATH or --task causal-lm
        return train_on_user_data(opts, build_model_for)
    print(f"lava train: loading {opts['model']} and {opts['data']} ...", flush=True)
    task = build_task(opts["model"], opts["data"], n_train=opts["n_train"] or None, n_eval=opts["n_eval"] or None,
                      seed=opts["seed"], max_len=opts["max_len"], image_size=opts["image_size"])
    model = build_model_for(opts, task)
    args = TrainingArguments(
        output_dir=opts["out"], epochs=opts["epochs"], max_steps=opts["max_steps"], batch_size=opts["batch_size"],
        grad_accum_steps=opts["grad_accum"], lr=opts["lr"], head_lr=opts["head_lr"], weight_decay=opts["weight_decay"],
        schedule=opts["schedule"], warmup_ratio=opts["warmup_ratio"], eval_every=opts["eval_every"],
        mixed_precision=opts["mixed_precision"], seed=opts["seed"], overwrite=opts["overwrite"],
        resume_from="auto" if opts["resume"] else None, progress=not opts["no_progress"],
        group_by_length=task.kind == "text", eval_at_start=True,
    )
    cli_info = {k: v for k, v in opts.items() if k not in ("overwrite", "resume", "no_progress")}
    trainer = Trainer(model, args, task.train, task.eval, run_info={"cli": cli_info})
    trainer.train()
    png = plot_metrics(opts["out"], title=f"{opts['method']} on {opts['model']} / {opts['data']}")
    adapter = Path(opts["out"]) / ("best" if (Path(opts["out"]) / "best").exists() else "adapter")
    print(f"plot:      {png}")
    print(f"evaluate:  lava eval {opts['out']}")
    print(f"inspect:   lava inspect {adapter}")
    if opts["method"] in ADAPTER_METHODS:
        print("reload in Python:\n"
              f"    base = <the same base model, e.g. lava_peft.train.tasks.load_base_model({opts['model']!r}, {opts['data']!r})[0]>\n"
              f"    model = lava_peft.AdaptedModel.from_pretrained(base, {str(adapter)!r})")
    return 0


# ============================================================================ eval / merge
def _locate_weights(path: str) -> tuple[Path, dict]:
    """(weights dir, run options) for a run dir or an adapter dir inside a run dir."""
    p = Path(path)
    if not p.exists():
        raise LavaError(f"{path} does not exist; give a run directory (from lava train) or an adapter directory")
    if (p / "run.json").is_file():
        run_dir = p
        p = p / "best" if (p / "best").is_dir() else p / "adapter"
    else:
        run_dir = p.parent
    if not ((p / "adapter_config.json").is_file() or (p / "model.safetensors").is_file()):
        raise LavaError(f"{p} holds no adapter (adapter_config.json) or trained weights (model.safetensors)")
    info = {}
    if (run_dir / "run.json").is_file():
        info = json.loads((run_dir / "run.json").read_text()).get("cli", {})
    return p, info


def _load_trained(path: str, model_name: str | None, data: str | None):
    """(model with the weights at ``path``, tokenizer, options)."""
    import torch

    from .io import read_safetensors
    from .model import AdaptedModel
    from .train.tasks import load_base_model

    weights, info = _locate_weights(path)
    model_name = model_name or info.get("model")
    data = data or info.get("data")
    if not model_name or not data:
        raise LavaError(f"{path} is not inside a `lava train` run directory: pass --model and --data to say "
                        "which base model and data set it belongs to")
    base, tok = load_base_model(model_name, data)
    if (weights / "adapter_config.json").is_file():
        model = AdaptedModel.from_pretrained(base, str(weights))
    else:
        tensors = read_safetensors(weights / "model.safetensors")
        params = dict(base.named_parameters())
        bad = [k for k in tensors if k not in params or params[k].shape != tensors[k].shape]
        if bad:
            raise LavaError(f"{weights}/model.safetensors does not fit model {model_name!r}: {bad[:3]}")
        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v)
        model = base.eval()
    return model, tok, dict(info, model=model_name, data=data), weights


def _add_eval_arguments(p):
    p.add_argument("path", help="run directory (uses best/, else adapter/) or an adapter directory")
    p.add_argument("--model", help="base model (default: the one recorded in the run)")
    p.add_argument("--data", help="data set (default: the one recorded in the run)")
    p.add_argument("--n-eval", dest="n_eval", type=int, help="held-out examples (default: as in the run; 0 = all)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=128)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_eval(ns) -> int:
    from .train import Trainer
    from .train.tasks import load_image_data, load_text_data, model_kind

    model, tok, info, weights = _load_trained(ns.path, ns.model, ns.data)
    n_eval = ns.n_eval if ns.n_eval is not None else info.get("n_eval", 1000)
    seed = info.get("seed", 0)
    if model_kind(info["model"])[0] == "text":
        _, ev = load_text_data(tok, 1, n_eval or None, seed, info.get("max_len", 64))
    else:
        _, ev = load_image_data(info["data"], 1, n_eval or None, seed, info.get("image_size", 64))
    trainer = Trainer(model, eval_data=ev, output_dir=str(weights), eval_batch_size=ns.batch_size, summary=False)
    result = trainer.evaluate(log=False)
    result = {"weights": str(weights), "model": info["model"], "data": info["data"], **result}
    if ns.json:
        print(json.dumps(result, indent=2))
    else:
        acc = f"{100 * result['accuracy']:.2f}%" if "accuracy" in result else "n/a"
        print(f"{weights}: accuracy {acc}, loss {result['loss']:.4f} on {result['samples']} held-out "
              f"{info['data']} examples ({result['seconds']:.1f}s)")
    return 0


def _add_merge_arguments(p):
    p.add_argument("path", help="run directory or adapter directory")
    p.add_argument("--out", required=True, help="directory for the merged model")
    p.add_argument("--model", help="base model (default: the one recorded in the run)")
    p.add_argument("--data", help="data set the head was trained for (default: from the run)")
    p.add_argument("--overwrite", action="store_true", help="replace files in a non-empty --out")


def cmd_merge(ns) -> int:
    from .model import AdaptedModel

    out = Path(ns.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not ns.overwrite:
        raise LavaError(f"--out {out} exists and is not empty; nothing was written. Pass --overwrite or choose another")
    model, tok, info, weights = _load_trained(ns.path, ns.model, ns.data)
    merged = model.merge_and_unload() if isinstance(model, AdaptedModel) else model
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(merged, "save_pretrained"):
        merged.save_pretrained(str(out))
        if tok is not None:
            tok.save_pretrained(str(out))
        how = f"transformers.AutoModelForSequenceClassification.from_pretrained({str(out)!r}), or lava train --model {out}"
    else:
        from .train.tasks import save_merged_vision_model

        save_merged_vision_model(merged, out, info["model"], info["data"])
        how = (f"lava train --model {out} --data {info['data']} ..., or in Python "
               f"lava_peft.train.tasks.load_base_model({str(out)!r}, {info['data']!r})[0]")
    print(f"merged {weights} into {info['model']}; wrote {out}\nload it with: {how}")
    return 0


# ============================================================================ inspect
def inspect_adapter(path: str) -> dict:
    """Method, targets, per-module parameters and byte counts of the adapter at ``path``."""
    from safetensors import safe_open

    from .io import CONFIG_NAME, WEIGHTS_NAME, read_json

    p = Path(path)
    if not p.exists():
        raise LavaError(f"{path} does not exist; give an adapter directory, its adapter_model.safetensors, or a run directory")
    if p.is_file():
        weights, directory = p, p.parent
    else:
        directory = p
        if (p / "run.json").is_file() and not (p / WEIGHTS_NAME).is_file():
            directory = p / "best" if (p / "best" / WEIGHTS_NAME).is_file() else p / "adapter"
        weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise LavaError(f"no {WEIGHTS_NAME} in {directory}; `lava inspect` reads adapters written by save_pretrained()")
    payload = read_json(directory / CONFIG_NAME) if (directory / CONFIG_NAME).is_file() else {}
    modules: dict[str, dict] = {}
    fp_modules = sorted((payload.get("base_model_fingerprint") or {}).get("modules", {}), key=len, reverse=True)
    total_params = tensor_bytes = n_tensors = 0
    try:
        with safe_open(str(weights), "pt") as fh:
            metadata = fh.metadata() or {}
            for key in fh.keys():
                sl = fh.get_slice(key)
                shape = list(sl.get_shape())
                dtype = sl.get_dtype()
                numel = 1
                for d in shape:
                    numel *= d
                size = numel * _DTYPE_BYTES.get(dtype, 4)
                if ".__saved__." in key:
                    module, param = key.split(".__saved__.", 1)
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
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise LavaError(f"{weights} cannot be read as safetensors ({exc}); the file is corrupt or truncated") from None
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
    from . import diagnostics
    from .model import AdaptedModel

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


# ============================================================================ plot
def _add_plot_arguments(p):
    p.add_argument("path", help="run directory or its metrics.jsonl")
    p.add_argument("--out", help="PNG path (default: <run>/metrics.png)")
    p.add_argument("--width", type=int, default=1200, help="pixels (default 1200)")
    p.add_argument("--height", type=int, default=450, help="pixels (default 450)")
    p.add_argument("--title", help="figure title")


def cmd_plot(ns) -> int:
    from .train.plot import plot_metrics

    out = plot_metrics(ns.path, ns.out, width=ns.width, height=ns.height, title=ns.title)
    print(f"wrote {out} ({ns.width}x{ns.height} px)")
    return 0


register_command(
    "train", "fine-tune a model with an adapter (LAVA, LoRA), its head only, or fully", _add_train_arguments, cmd_train,
    description=(
        "Fine-tune a pretrained model on a packaged data set and write the run to --out:\n"
        "  metrics.jsonl (one JSON record per log/eval), metrics.png, adapter/ (final), best/ (best eval),\n"
        "  checkpoints/ (resumable), run.json, summary.json.\n\n"
        "examples:\n"
        "  lava train --model minilm --data rotten_tomatoes --method lava --rank 8 --epochs 2 --out runs/rt\n"
        "  lava train --model mobilenet_v2 --data fashion_mnist --method lora --targets all-conv --out runs/fm\n"
        "  lava train --model minilm --data rotten_tomatoes --method shira --mask snip --density 0.01 --out runs/sh\n"
        "  lava train --config run.yaml        # keys are the option names below, e.g.  lr: 0.002"
    ),
)
register_command("eval", "accuracy of a trained adapter on held-out data", _add_eval_arguments, cmd_eval)
register_command("merge", "fold an adapter into its base model and save the plain model", _add_merge_arguments, cmd_merge)
register_command("inspect", "show what an adapter file holds: method, targets, parameter and byte counts",
                 _add_inspect_arguments, cmd_inspect)
register_command("plot", "draw loss and accuracy curves of a run as a PNG", _add_plot_arguments, cmd_plot)


def _load_plugins() -> None:
    for name in PLUGIN_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                continue  # the plugin is not installed / not written yet
            raise


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(
        prog="lava",
        description=(
            "lava-peft: parameter-efficient fine-tuning. LAVA trains a sum of rank-1 components per layer\n"
            "(LoRA form on Linear, CP decomposition on conv kernels) with an orthogonality regularizer.\n\n"
            "Start here:\n"
            "  lava train --model minilm --data rotten_tomatoes --out runs/rt   # a few minutes on a 2-core CPU\n"
            "  lava plot runs/rt && lava inspect runs/rt\n\n"
            "Run `lava <command> --help` for the options of a command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"lava-peft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "_command", None):
        parser.print_help()
        return 2
    start = time.perf_counter()
    try:
        code = ns._command.run(ns)
    except LavaError as exc:
        print(f"lava {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lava {ns.command}: interrupted after {time.perf_counter() - start:.0f}s", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
