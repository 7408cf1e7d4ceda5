"""`lava eval`, `lava merge` and `lava plot`: use a trained run."""

from __future__ import annotations

import json
from pathlib import Path

from ..adapter_files import CONFIG_NAME
from ..errors import LavaError
from ._paths import check_out_dir_path
from ..train.checkpoint import FULL_WEIGHTS_NAME, RUN_MARKER

def _run_info(run_dir: Path, need: bool) -> dict:
    """The `lava train` options recorded in ``run_dir/run.json``; a corrupt file is an error only when
    they are needed (``need``: ``--model`` or ``--data`` not given)."""
    file = run_dir / RUN_MARKER
    try:
        info = json.loads(file.read_text())
        info = info.get("cli", {}) if isinstance(info, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        info, why = None, str(exc)
    else:
        why = "not a JSON object with a 'cli' mapping"
    if isinstance(info, dict):
        return info
    if need:
        raise LavaError(f"{file} is corrupt ({why}); pass --model and --data to name the base model and data set "
                        "yourself, or restore the file")
    return {}


def _locate_weights(path: str, given: bool = False) -> tuple[Path, dict]:
    """(weights dir, run options) for a run dir or an adapter dir inside a run dir (``given``: --model and
    --data were passed, so the run's record is not needed)."""
    p = Path(path)
    if not p.exists():
        raise LavaError(f"{path} does not exist; give a run directory (from lava train) or an adapter directory")
    if (p / RUN_MARKER).is_file():
        run_dir = p
        p = p / "best" if (p / "best").is_dir() else p / "adapter"
    else:
        run_dir = p.parent
    if not ((p / CONFIG_NAME).is_file() or (p / FULL_WEIGHTS_NAME).is_file()):
        raise LavaError(f"{p} holds no adapter (adapter_config.json) or trained weights (model.safetensors)")
    info = _run_info(run_dir, need=not given) if (run_dir / RUN_MARKER).is_file() else {}
    return p, info


def _load_trained(path: str, model_name: str | None, data: str | None):
    """(model with the weights at ``path``, tokenizer, options)."""
    import torch

    from ..io import read_safetensors
    from ..model import AdaptedModel
    from ..train.tasks import load_base_model

    weights, info = _locate_weights(path, given=bool(model_name and data))
    model_name = model_name or info.get("model")
    data = data or info.get("data")
    if not model_name or not data:
        raise LavaError(f"{path} is not inside a `lava train` run directory: pass --model and --data to say "
                        "which base model and data set it belongs to")
    base, tok = load_base_model(model_name, data)
    if (weights / CONFIG_NAME).is_file():
        model = AdaptedModel.from_pretrained(base, str(weights))
    else:
        tensors = read_safetensors(weights / FULL_WEIGHTS_NAME)
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
    from ..train import Trainer
    from ..train.tasks import load_image_data, load_text_data, model_kind

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
    from ..model import AdaptedModel

    out = check_out_dir_path(ns.out)
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
        from ..train.tasks import save_merged_vision_model

        save_merged_vision_model(merged, out, info["model"], info["data"])
        how = (f"lava train --model {out} --data {info['data']} ..., or in Python "
               f"lava_peft.train.tasks.load_base_model({str(out)!r}, {info['data']!r})[0]")
    print(f"merged {weights} into {info['model']}; wrote {out}\nload it with: {how}")
    return 0


def _add_plot_arguments(p):
    p.add_argument("path", help="run directory or its metrics.jsonl")
    p.add_argument("--out", help="PNG path (default: <run>/metrics.png)")
    p.add_argument("--width", type=int, default=1200, help="pixels (default 1200)")
    p.add_argument("--height", type=int, default=450, help="pixels (default 450)")
    p.add_argument("--title", help="figure title")


def cmd_plot(ns) -> int:
    from ..train.plot import plot_metrics

    out = plot_metrics(ns.path, ns.out, width=ns.width, height=ns.height, title=ns.title)
    print(f"wrote {out} ({ns.width}x{ns.height} px)")
    return 0
