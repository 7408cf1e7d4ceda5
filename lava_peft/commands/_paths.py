"""Checks on the paths a `lava` command is given, made before anything is loaded or written."""

from __future__ import annotations

from pathlib import Path

from ..errors import LavaConfigError


def check_out_dir_path(out: str | Path, flag: str = "--out") -> Path:
    """``out`` as a path a directory can be made at: refused (one clear line) when it is a file or when
    one of its parents is a file (``--out afile/sub``)."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise LavaConfigError(f"{flag} {out} is a file; give a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LavaConfigError(f"{flag} {out}: {parent} is a file, so no directory can be made inside it; "
                                      f"choose another {flag}")
            break
    return path
