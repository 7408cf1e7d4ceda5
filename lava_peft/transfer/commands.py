"""``lava transfer``: move a trained adapter to another base LM (Trans-LoRA), end to end.

    lava transfer --source llama-tiny --target gpt2-tiny --out runs/transfer
    python -m lava_peft.transfer.commands --source llama-tiny --target llama-small --out runs/t2

Wiring into ``lava``: ``register(register_command)`` from ``lava_peft.cli``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from .pipeline import DISTILL_INPUTS, TransferConfig, TransferRun, load_lm
from .training import METHODS

__all__ = ["add_arguments", "run", "register", "main", "HELP"]

HELP = "move a trained adapter to another base LM with filtered synthetic data (Trans-LoRA)"
DESCRIPTION = """\
Trans-LoRA, all stages in one run folder (a finished stage is reused when the command is run again):
  1 source          seeds + an adapter on the SOURCE model trained on the real task data
  2 discriminator   an adapter on the source answering yes/no to "is this text from the task?"
                    (real inputs vs inputs the source model generates)
  3 synthetic       the TARGET model continues a few-shot list of the 5 seed inputs; candidates
                    are kept when the discriminator says p(yes) > p(no), until --n-synthetic
  4 distill         a new adapter on the target imitates source + adapter on those inputs
                    (logit KD with one tokenizer, sequence-level KD across tokenizers)
  5 evaluate        accuracy of the source + adapter, the target zero-shot, the target + new adapter

Models: zoo names (pretrained on first use, ~10 min each on 2 CPU cores; `lava zoo list`) or local
Hugging Face causal-LM folders. Task: Rotten Tomatoes sentiment as a completion
("Review: <text>\\nSentiment:" -> " positive" / " negative"), by-movie split.

example:
  lava transfer --source llama-tiny --target gpt2-tiny --target-method lava --out runs/transfer
"""

_HELP = {
    "source": "source model: a zoo name (llama-tiny, llama-small, gpt2-tiny, ...) or a local HF model folder",
    "target": "target model (same forms as --source)",
    "source_method": f"adapter type of the source (and discriminator) adapters: {' | '.join(METHODS)}",
    "target_method": f"adapter type trained on the target: {' | '.join(METHODS)}",
    "r": "adapter rank",
    "alpha": "adapter scale numerator (increment scaled by alpha / r)",
    "n_train": "real training examples for the source adapter",
    "n_test": "label-balanced test examples (by-movie split) for every accuracy",
    "n_seeds": "real examples kept for the generator's few-shot prompt (the paper keeps 5)",
    "n_synthetic": "accepted synthetic inputs to distill on",
    "n_disc": "real and source-generated inputs (each) to train the discriminator",
    "source_epochs": "epochs of the source adapter (and of --upper-bound)",
    "source_lr": "learning rate of the source adapter (and of --upper-bound)",
    "disc_epochs": "epochs of the discriminator", "disc_lr": "learning rate of the discriminator",
    "distill_epochs": "epochs of distillation", "distill_lr": "learning rate of distillation",
    "batch_size": "mini-batch size of every training stage",
    "kd": "distillation: auto (logit if source and target share the tokenizer, else sequence) | logit | sequence",
    "kd_all_tokens": "logit KD on every token of prompt + answer, not only on the answer",
    "kd_temperature": "softmax temperature T of logit KD (loss scaled by T^2)",
    "temperature": "sampling temperature of the generators", "top_p": "nucleus sampling top-p of the generators",
    "max_new_tokens": "longest generated input, in tokens",
    "max_candidates": "stop proposing after this many candidates (0 = 50 x n-synthetic)",
    "distill_inputs": f"what to distill on: {' | '.join(DISTILL_INPUTS)} (filtered = Trans-LoRA; others are ablations)",
    "seed": "random seed of data draws, adapter init and sampling",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="run folder (created; rerunning resumes it)")
    for f in dataclasses.fields(TransferConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=_HELP[f.name])
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), type(f.default))
            parser.add_argument(flag, type=kind, default=f.default, help=f"{_HELP[f.name]} (default: {f.default})")
    parser.add_argument("--upper-bound", action="store_true",
                        help="also train the target on the real data (the ceiling a transfer can reach)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _summary_lines(summary: dict) -> list[str]:
    acc = summary["accuracy"]
    names = {"source_with_adapter": "source + adapter", "target_zero_shot": "target zero-shot",
             "target_with_transferred_adapter": "target + transferred adapter",
             "upper_bound_target_on_real_data": "target trained on real data (upper bound)"}
    lines = [f"Trans-LoRA {summary['source']} -> {summary['target']}  (KD: {summary['kd_mode']}, "
             f"inputs: {summary['distill_inputs']}, {summary['source_method']} -> {summary['target_method']})"]
    lines += [f"  {names[k]:44s} {v:6.1%}" for k, v in acc.items()]
    syn = summary.get("synthetic")
    if syn:
        lines.append(f"  synthetic: {syn['accepted']} accepted of {syn['candidates']} candidates "
                     f"(acceptance {syn['acceptance_rate']:.1%})")
    if summary.get("transferred_adapter_untrained"):
        lines.append("  WARNING: no synthetic input was accepted, so the transferred adapter was never trained "
                     "(it equals the target zero-shot)")
    lines.append(f"  discriminator held-out accuracy {summary['discriminator_held_out_accuracy']:.1%}")
    lines.append("  stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["stage_seconds"].items() if v))
    return lines


def run(ns: argparse.Namespace) -> int:
    cfg = TransferConfig(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(TransferConfig)})
    t0 = time.time()
    job = TransferRun(cfg, ns.out, lambda: load_lm(cfg.source), lambda: load_lm(cfg.target),
                      progress=not ns.no_progress)
    summary = job.run(upper_bound=ns.upper_bound)
    for line in _summary_lines(summary):
        print(line)
    print(f"  total {time.time() - t0:.0f}s; everything is in {ns.out} (summary.json, synthetic/*.jsonl, adapters)")
    return 0


def register(register_command) -> None:
    """Add ``lava transfer`` to the ``lava`` command (call with ``lava_peft.cli.register_command``)."""
    register_command("transfer", HELP, add_arguments, run, DESCRIPTION)


def main(argv: list[str] | None = None) -> int:
    """``python -m lava_peft.transfer.commands ...``: exactly ``lava transfer ...`` (the CLI's one-line errors, ``--debug``)."""
    from .. import cli

    return cli.main(["transfer", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
