"""The ``lava`` command: train, evaluate, merge, inspect and plot adapters.

    lava train --model minilm --data rotten_tomatoes --rank 8 --out runs/rt
    lava train --config my_run.yaml            (keys = the long option names)
    lava eval runs/rt                          (accuracy of the best/final adapter)
    lava merge runs/rt/adapter --out merged/   (a plain model with the adapter folded in)
    lava inspect runs/rt/adapter               (method, targets, parameter and byte counts)
    lava plot runs/rt                          (loss/accuracy curves as a PNG)

A user error (bad option, missing or corrupt file, unusable path) prints one line on stderr and
exits with code 2; ``lava --debug <command> ...`` also prints the traceback.

Subcommands live in a registry (:func:`register_command`); another module adds one with
``register_command("bench", help=..., add_arguments=..., run=...)`` and is imported by
listing it in :data:`PLUGIN_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

from .commands.evaluate import _add_eval_arguments, _add_merge_arguments, _add_plot_arguments, cmd_eval, cmd_merge, cmd_plot
from .commands.inspect import _add_inspect_arguments, adapter_diagnostics, cmd_inspect, inspect_adapter  # noqa: F401
from .commands.train import (  # noqa: F401  (the train helpers are part of this module's API)
    FLAG_OPTIONS, GENERAL_OPTIONS, TRAIN_DESCRIPTION, TRAIN_HELP, TRAINING_MODES, _add_train_arguments, adapter_config_for, adapter_methods,
    build_model_for, cmd_train, read_config_file, resolve_train_options, train_options,
)
from .errors import LavaError

PLUGIN_MODULES: list[str] = [
    "lava_peft.commands.generate",    # lava generate
    "lava_peft.ranking.commands",     # lava rank
    "lava_peft.transfer.commands",    # lava transfer
    "lava_peft.zoo.commands",         # lava zoo
]
"""Modules imported (if they exist) before parsing; each either calls :func:`register_command` when
imported or defines ``register(register_command)``, which is then called."""


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


register_command("train", TRAIN_HELP, _add_train_arguments, cmd_train, description=TRAIN_DESCRIPTION)
register_command("eval", "accuracy of a trained adapter on held-out data", _add_eval_arguments, cmd_eval)
register_command("merge", "fold an adapter into its base model and save the plain model", _add_merge_arguments, cmd_merge)
register_command("inspect", "show what an adapter file holds: method, targets, parameter and byte counts",
                 _add_inspect_arguments, cmd_inspect)
register_command("plot", "draw loss and accuracy curves of a run as a PNG", _add_plot_arguments, cmd_plot)


def __getattr__(name: str):
    """``TRAIN_OPTIONS`` / ``METHODS`` / ``ADAPTER_METHODS``: computed from the registry when read."""
    if name == "TRAIN_OPTIONS":
        return train_options()
    if name == "ADAPTER_METHODS":
        return adapter_methods()
    if name == "METHODS":
        return (*adapter_methods(), *TRAINING_MODES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load_plugins() -> None:
    for name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                continue  # the plugin is not installed / not written yet
            raise
        register = getattr(module, "register", None)
        if callable(register):
            register(register_command)


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
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"lava-peft {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_arguments(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        p.set_defaults(_command=cmd)
    return parser


DEBUG_HELP = "on an error, print the full Python traceback (by default: one line saying what to change)"
USER_ERRORS = (LavaError, OSError, ValueError)
"""Errors a user's input causes (a lava-peft error, a path that cannot be read or written, a value that
does not parse): reported as one line on stderr with exit code 2; anything else is a bug and keeps its
traceback."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, LavaError):
        return text
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:  # e.g. [Errno 20] Not a directory: 'x'
        where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
        text = f"{where}: {exc.strerror}"
    return f"{text} ({type(exc).__name__}; run with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run ``lava <command>``: 0 on success, 2 on a user error (one line on stderr; ``--debug`` adds
    the traceback), 130 on Ctrl-C."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "_command", None):
        parser.print_help()
        return 2
    start = time.perf_counter()
    try:
        code = ns._command.run(ns)
    except USER_ERRORS as exc:
        if ns.debug:
            traceback.print_exc()
        print(f"lava {ns.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lava {ns.command}: interrupted after {time.perf_counter() - start:.0f}s", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
