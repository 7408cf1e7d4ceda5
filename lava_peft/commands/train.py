"""`lava train`: its options (general + every registered method's own), the config file, the run.

The method-specific parts come from the registry: a config class declares ``cli_help`` (the
method is offered), ``cli_options``, ``cli_notes``, ``cli_default_lr``, ``from_cli`` and an
optional ``cli_prepare`` hook (see :class:`lava_peft.config.AdapterConfig`).
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Any

from ..config import config_class, method_hook, registered_methods
from ..errors import LavaConfigError
from .user_train import USER_FLAG_OPTIONS, USER_TRAIN_OPTIONS, train_on_user_data, wants_user_data
from ._paths import check_out_dir_path

# name -> (default, type, help).  A YAML/JSON config file uses the same names.  The methods'
# own options (``cli_options`` of their configs) are added after these by :func:`train_options`.
GENERAL_OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "model": ("minilm", str, "model name (minilm, mobilenet_v2, craft_vgg16_bn, small_cnn) or a Hugging Face model directory"),
    "data": ("rotten_tomatoes", str, "data set: rotten_tomatoes (text), fashion_mnist or digits (images)"),
    "method": ("lava", str, "{methods} (adapters), head (train only the new head) | full (fine-tune everything)"),
    "rank": (8, int, "adapter rank r (number of rank-1 components{notes})"),
    "alpha": (16.0, float, "adapter scale numerator: the increment is multiplied by alpha/rank{notes}"),
    "targets": (None, str, "modules to adapt: comma-separated names/suffixes (query,value), a regex, "
                           "'all-linear' or 'all-conv' (default: query,value for text, all-conv for images)"),
    "out": (None, str, "run directory for metrics, checkpoints and the adapter (required)"),
    "epochs": (3.0, float, "passes over the training data"),
    "max_steps": (None, int, "stop after this many optimizer steps (overrides --epochs)"),
    "lr": (None, float, "learning rate of the adapter (default {lrs})"),
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
GENERAL_OPTIONS.update(USER_TRAIN_OPTIONS)  # your own data / --task causal-lm (commands/user_train.py)
FLAG_OPTIONS.update(USER_FLAG_OPTIONS)
TRAIN_HELP = "fine-tune a model with an adapter (LAVA, LoRA), its head only, or fully"
TRAIN_DESCRIPTION = (
    "Fine-tune a pretrained model on a packaged data set and write the run to --out:\n"
    "  metrics.jsonl (one JSON record per log/eval), metrics.png, adapter/ (final), best/ (best eval),\n"
    "  checkpoints/ (resumable), run.json, summary.json.\n\n"
    "examples:\n"
    "  lava train --model minilm --data rotten_tomatoes --method lava --rank 8 --epochs 2 --out runs/rt\n"
    "  lava train --model mobilenet_v2 --data fashion_mnist --method lora --targets all-conv --out runs/fm\n"
    "  lava train --model minilm --data rotten_tomatoes --method shira --mask snip --density 0.01 --out runs/sh\n"
    "  lava train --config run.yaml        # keys are the option names below, e.g.  lr: 0.002"
)
TRAINING_MODES = ("head", "full")
"""`--method` values that train the model itself instead of an adapter."""
DEFAULT_LR = 1e-3


def adapter_methods() -> tuple[str, ...]:
    """The registered methods `lava train` offers (their configs set ``cli_help``)."""
    return tuple(m for m in registered_methods() if config_class(m).cli_help is not None)


def _grouped(values: dict[str, Any]) -> list[tuple[str, Any]]:
    """``[("shira/sft", value), ...]``: methods that share a value listed together, in method order."""
    groups: dict[Any, list[str]] = {}
    for method, value in values.items():
        groups.setdefault(value, []).append(method)
    return [("/".join(methods), value) for value, methods in groups.items()]


def train_options() -> dict[str, tuple[Any, Any, str]]:
    """Every `lava train` option: the general ones (help completed from the methods' ``cli_notes``),
    then each method's ``cli_options`` (an option shared by methods is declared identically)."""
    methods = adapter_methods()
    classes = {m: config_class(m) for m in methods}
    options = {}
    for name, (default, typ, help_) in GENERAL_OPTIONS.items():
        notes = {m: c.cli_notes[name] for m, c in classes.items() if name in c.cli_notes}
        fill = {"notes": "".join(f"; {who}: {note}" for who, note in _grouped(notes)), "methods": " | ".join(methods)}
        if name == "lr":
            lrs = {m: c.cli_default_lr for m, c in classes.items() if c.cli_default_lr != DEFAULT_LR}
            why = {m: classes[m].cli_notes.get("lr") for m in lrs}
            fill["lrs"] = f"{DEFAULT_LR:g}" + "".join(
                f"; {lr:g} for {who}" + (f" ({why[who.split('/')[0]]})" if why[who.split('/')[0]] else "")
                for who, lr in _grouped(lrs))
        options[name] = (default, typ, help_.format(**fill) if "{" in help_ else help_)
    for method, cls in classes.items():
        for name, spec in cls.cli_options.items():
            if name in options and options[name] != spec:
                raise LavaConfigError(f"method {method!r} declares the lava train option {name!r} differently from "
                                      "another method; declare it once and share it")
            options[name] = spec
    return options


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file with any of the options below "
                   "(keys as the option names, e.g. batch_size: 16); command-line flags win")
    for name, (default, typ, help_) in train_options().items():
        shown = "" if default is None else f" (default: {default})"
        p.add_argument(_flag(name), dest=name, type=typ, default=argparse.SUPPRESS, help=help_ + shown,
                       metavar=name.upper())
    for name, help_ in FLAG_OPTIONS.items():
        p.add_argument(_flag(name), dest=name, action="store_true", default=argparse.SUPPRESS, help=help_)


def read_config_file(path: str) -> dict:
    """A YAML/JSON mapping of train options; unknown keys are errors that suggest the right name."""
    file = Path(path)
    if not file.exists():
        raise LavaConfigError(f"config file {path!r} does not exist")
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise LavaConfigError(f"config file {path} cannot be read ({why}); give a readable YAML or JSON file") from None
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
    options = train_options()
    known = set(options) | set(FLAG_OPTIONS)
    out, unknown = {}, []
    for key, value in data.items():
        norm = str(key).replace("-", "_")
        if norm not in known:
            close = difflib.get_close_matches(norm, known, 1)
            unknown.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        if norm in options and value is not None:
            typ = options[norm][1]
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
    opts = {name: default for name, (default, _, _) in train_options().items()}
    opts.update({name: False for name in FLAG_OPTIONS})
    if getattr(ns, "config", None):
        opts.update(read_config_file(ns.config))
    opts.update({k: v for k, v in vars(ns).items() if k in opts})
    if not opts["out"]:
        raise LavaConfigError("no output directory: pass --out DIR (or 'out:' in the config file)")
    methods = (*adapter_methods(), *TRAINING_MODES)
    if opts["method"] not in methods:
        raise LavaConfigError(f"--method must be one of {methods}; got {opts['method']!r}")
    if opts["lr"] is None:
        opts["lr"] = DEFAULT_LR if opts["method"] in TRAINING_MODES else config_class(opts["method"]).cli_default_lr
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
    from ..train.checkpoint import RUN_OUTPUTS, RunDirError

    path = check_out_dir_path(out)
    present = [n for n in RUN_OUTPUTS if (path / n).exists()]
    if present and not (overwrite or resume):
        raise RunDirError(f"--out {out} already holds a run ({', '.join(present)}); nothing was changed. "
                          "Pass --overwrite to replace it, --resume to continue it, or choose another --out")
    if resume and not (path / "checkpoints").is_dir():
        raise RunDirError(f"--resume: {out} has no checkpoints to resume from")


def build_model_for(opts: dict, task):
    """Apply ``--method`` to the task's model; returns the model to train."""
    from ..model import adapt

    model = task.model
    if opts["method"] in TRAINING_MODES:
        for p in model.parameters():
            p.requires_grad_(opts["method"] == "full")
        if opts["method"] == "head":
            for name in task.heads:
                for p in model.get_submodule(name).parameters():
                    p.requires_grad_(True)
        return model
    targets = _parse_targets(opts["targets"], task.default_targets)
    return adapt(model, adapter_config_for(opts, targets, task))


def adapter_config_for(opts: dict, targets, task):
    """The adapter config that ``--method`` and its options describe: the method's ``from_cli``, then
    its ``cli_prepare`` hook where it needs the model or the data (SHiRA masks, LT-SFT's phase 1)."""
    cls = config_class(opts["method"])
    common = dict(r=opts["rank"], alpha=opts["alpha"], target_modules=targets, modules_to_save=task.heads)
    config = cls.from_cli(opts, common)
    if cls.cli_prepare is not None:
        config = method_hook(cls.cli_prepare)(config, opts, task)
    return config


def _train_ranking(opts: dict) -> int:
    """``lava train --task rank-count`` (or another ranking task): the same run as ``lava rank``."""
    from ..ranking import commands as ranking

    parser = argparse.ArgumentParser(prog="lava train --task " + opts["task"])
    ranking.add_arguments(parser)
    argv = ["--task", opts["task"], "--out", opts["out"], "--seed", str(opts["seed"])]
    for name, flag in (("epochs", "--epochs"), ("n_train", "--n-train"), ("n_eval", "--n-eval"),
                       ("batch_size", "--batch-size"), ("lr", "--lr"), ("image_size", "--image-size")):
        if opts.get(name) is not None and opts.get(name) != GENERAL_OPTIONS[name][0]:
            argv += [flag, str(opts[name])]
    if opts.get("overwrite"):
        argv.append("--overwrite")
    return ranking.run(parser.parse_args(argv))


def cmd_train(ns: argparse.Namespace) -> int:
    opts = resolve_train_options(ns)
    from ..train.tasks import build_task, model_kind

    model_kind(opts["model"])  # fail fast on a bad model name/path, before anything is loaded
    _check_out_dir(opts["out"], opts["overwrite"], opts["resume"])
    import torch

    from ..train import Trainer, TrainingArguments, plot_metrics, set_seed

    from ..train.system import pick_num_threads

    threads, why = (opts["threads"], "--threads") if opts["threads"] else pick_num_threads()
    torch.set_num_threads(threads)
    print(f"lava train: {threads} CPU thread(s) ({why})", flush=True)
    set_seed(opts["seed"])
    if str(opts.get("task", "")).startswith("rank-"):  # the ranking adapter's tasks: `lava rank` does the work
        return _train_ranking(opts)
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
    if opts["method"] not in TRAINING_MODES:
        print("reload in Python:\n"
              f"    base = <the same base model, e.g. lava_peft.train.tasks.load_base_model({opts['model']!r}, {opts['data']!r})[0]>\n"
              f"    model = lava_peft.AdaptedModel.from_pretrained(base, {str(adapter)!r})")
    return 0
