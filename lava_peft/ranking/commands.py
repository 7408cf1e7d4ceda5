"""``lava rank``: train the ranking adapter on a ranking task and report PLCC / SRCC / pairwise accuracy.

    lava rank --task rank-count --out runs/rank-count            # MobileNet–MiniLM towers, Fashion-MNIST
    lava rank --task rank-rotation --out runs/rank-rot --epochs 8
    lava rank --task rank-count --no-ranking-branch --out runs/reg-only

Wiring (done by the CLI): ``register(register_command)`` adds the subcommand.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import LavaConfigError
from .adapter import PAIR_HEADS, RankingAdapter, RankingConfig
from .tasks import TASKS, build_task

__all__ = ["add_arguments", "register", "run"]

DESCRIPTION = """\
Train a ranking-aware adapter (prompts + text-conditioned fusion + regression head +
pairwise ranking attention) over frozen towers: by default the packaged ImageNet
MobileNetV2 (image tokens) and MiniLM-L6 (text tokens) — a MobileNet–MiniLM pair, not CLIP.

Tasks (canvases of Fashion-MNIST items, one text instruction each):
  rank-count        how many items (1-9)
  rank-count-class  how many <class> (two classes per canvas; the text decides)
  rank-scale | rank-rotation | rank-brightness   a continuous attribute of one item

Writes to --out: metrics.jsonl, summary.json, run.json (Trainer), ranking_metrics.json,
ranking_adapter/ (safetensors + JSON) and ranking.png (predicted vs true, images in model order).
Fashion-MNIST: apt-get install dataset-fashion-mnist, or --fashion-mnist-dir DIR
(an unpacked .deb or the folder of the idx files)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.add_argument("--task", default="rank-count", choices=TASKS, help="ranking task (default: rank-count)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--epochs", type=float, default=10, help="passes over the training canvases (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the init and the batch order")
    p.add_argument("--n-train", type=int, default=1000, help="training canvases (default 1000)")
    p.add_argument("--n-eval", type=int, default=400, help="eval canvases (default 400)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch; the pair loss uses all B² ordered pairs")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (weight decay 0.01)")
    p.add_argument("--width", type=int, default=128, help="adapter width d (default 128)")
    p.add_argument("--prompts", type=int, default=8, help="learnable prompt tokens (default 8)")
    p.add_argument("--prompt-mode", choices=("vector", "scalar"), default="vector",
                   help="a vector per prompt token, or one scalar per token broadcast over the width (reference code)")
    p.add_argument("--no-prompts", action="store_true", help="no prompt tokens (ablation)")
    p.add_argument("--no-ranking-branch", action="store_true", help="regression head only (ablation)")
    p.add_argument("--pair-head", choices=PAIR_HEADS, default="attention",
                   help="ranking-aware attention, or a plain mean-difference pair head (ablation)")
    p.add_argument("--pairs-per-image", type=int, default=None, help="sample K partners per image instead of all pairs")
    p.add_argument("--image-size", type=int, default=224, help="canvas side fed to MobileNetV2 (224: 7×7 = 49 tokens)")
    p.add_argument("--glyphs", choices=("fashion_mnist", "digits"), default="fashion_mnist",
                   help="item images: Fashion-MNIST (default) or scikit-learn's 8×8 digits (no download)")
    p.add_argument("--fashion-mnist-dir", default=None, help="folder of the Fashion-MNIST idx files (or an unpacked .deb)")
    p.add_argument("--no-cache", action="store_true",
                   help="run the frozen towers every step instead of once (same numbers, much slower)")
    p.add_argument("--no-plot", action="store_true", help="skip ranking.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")


def _digits_glyphs():
    from ..data import load_digits_split

    x_tr, y_tr, x_te, y_te = load_digits_split()

    def glyphs(x):  # float [N, 8, 8] in [0, 1] -> uint8 [N, 16, 16] (each pixel doubled)
        return np.kron((x * 255).round().astype(np.uint8), np.ones((2, 2), np.uint8))

    return ((glyphs(x_tr), y_tr), (glyphs(x_te), y_te), tuple(f"digit {k}" for k in range(10)))


def _config_from(ns: argparse.Namespace) -> RankingConfig:
    return RankingConfig(width=ns.width, prompts=0 if ns.no_prompts else ns.prompts, prompt_mode=ns.prompt_mode,
                         ranking_branch=not ns.no_ranking_branch, pair_head=ns.pair_head,
                         pairs_per_image=ns.pairs_per_image)


def run(ns: argparse.Namespace, towers=None) -> int:
    """Run ``lava rank``; ``towers`` = ``(image_tower, text_tower)`` to use instead of MobileNet–MiniLM."""
    from .plot import plot_ranking
    from .towers import mobilenet_minilm_towers
    from .train import train_ranking

    if ns.n_train < 2 or ns.n_eval < 2:
        raise LavaConfigError(f"--n-train and --n-eval must be >= 2; got {ns.n_train}, {ns.n_eval}")
    if ns.batch_size < 2:
        raise LavaConfigError(f"--batch-size must be >= 2 (pairs need two images); got {ns.batch_size}")
    config = _config_from(ns)
    out = Path(ns.out)
    if out.exists() and any(out.iterdir()) and not ns.overwrite:
        raise LavaConfigError(f"--out {out} is not empty; pass --overwrite or choose another directory")
    start = time.perf_counter()
    torch.manual_seed(ns.seed)
    glyphs = _digits_glyphs() if ns.glyphs == "digits" else None
    task = build_task(ns.task, ns.n_train, ns.n_eval, ns.seed, glyphs=glyphs, path=ns.fashion_mnist_dir)
    image_tower, text_tower = towers if towers is not None else mobilenet_minilm_towers()
    model = RankingAdapter(image_tower, text_tower, config)
    result = train_ranking(model, task, out, epochs=ns.epochs, batch_size=ns.batch_size, lr=ns.lr, seed=ns.seed,
                           image_size=ns.image_size, cache=not ns.no_cache, progress=not ns.quiet,
                           summary=not ns.quiet, overwrite=ns.overwrite,
                           run_info={"command": "lava rank", "glyphs": ns.glyphs})
    if not ns.no_plot:
        plot_ranking(task.eval_images, task.eval_targets, result["eval_scores"].numpy(), out / "ranking.png",
                     title=f"{task.name} ({model.config.towers})")
    ev = result["eval"]
    keys = ("plcc", "srcc", "pairwise_accuracy", "mae")
    line = ", ".join(f"{k} {ev[k]:.3f}" for k in keys if k in ev)
    if not ns.quiet:
        print(f"lava rank {task.name}: {line}  ({time.perf_counter() - start:.0f}s; files in {out})")
        print(json.dumps({k: ev[k] for k in keys if k in ev}))
    return 0


def register(register_command) -> None:
    """Add ``lava rank`` to the CLI registry (``lava_peft.cli.register_command``)."""
    register_command("rank", "train the ranking-aware adapter on a text-driven image ordering task",
                     add_arguments, run, description=DESCRIPTION)


def main(argv: list[str] | None = None) -> int:
    """``python -m lava_peft.ranking.commands ...``: the same as ``lava rank ...``."""
    import sys

    from ..errors import LavaError

    parser = argparse.ArgumentParser(prog="lava rank", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        return run(ns)
    except LavaError as exc:
        print(f"lava rank: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
