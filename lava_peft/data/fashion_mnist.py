"""Fashion-MNIST (60k train / 10k test, 28x28 grey, 10 classes) from Debian's ``dataset-fashion-mnist``.

Where the idx ``.gz`` files are looked for, in order:

1. the ``path`` argument,
2. the ``LAVA_FASHION_MNIST_DIR`` environment variable,
3. ``/usr/share/datasets/fashion-mnist`` (where ``apt-get install dataset-fashion-mnist`` puts them),
4. the user cache ``~/.cache/lava-peft/fashion-mnist`` (``$XDG_CACHE_HOME`` / ``$LAVA_PEFT_CACHE``
   move it), filled without root by :func:`fetch_fashion_mnist` —
   ``python -m lava_peft.data.fetch``, which ``make test`` runs.

A directory may be the folder holding the four files or the root of an unpacked .deb
(``dpkg -x dataset-fashion-mnist_*.deb DIR``): ``DIR/usr/share/datasets/fashion-mnist``
is tried too.
"""

from __future__ import annotations

import functools
import gzip
import os

import numpy as np

from ._errors import DatasetNotInstalledError
from .debian import fetch_debian_package, user_cache_dir

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_SYSTEM_DIR",
    "INSTALL_FASHION_MNIST",
    "fashion_mnist_cache_dir",
    "fashion_mnist_dir",
    "fetch_fashion_mnist",
    "load_fashion_mnist",
]

FASHION_MNIST_ENV = "LAVA_FASHION_MNIST_DIR"
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
_DEB_SUBDIR = os.path.join("usr", "share", "datasets", "fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
INSTALL_FASHION_MNIST = (
    "python -m lava_peft.data.fetch   (no root: fetches the Debian package into the user cache; "
    "`make test` runs it); or apt-get update && apt-get install -y dataset-fashion-mnist   "
    "(as root); or by hand: apt-get download dataset-fashion-mnist && "
    "dpkg -x dataset-fashion-mnist_*.deb DIR && "
    f"export {FASHION_MNIST_ENV}=DIR/{_DEB_SUBDIR.replace(os.sep, '/')}"
)


def _has_files(d: str) -> bool:
    return all(os.path.isfile(os.path.join(d, f)) for s in _FILES.values() for f in s[:2])


def fashion_mnist_cache_dir() -> str:
    """Where :func:`fetch_fashion_mnist` puts the files: ``<user cache>/fashion-mnist``."""
    return os.path.join(user_cache_dir(), "fashion-mnist")


def fashion_mnist_dir(path: str | os.PathLike | None = None) -> str:
    """The folder holding the four idx ``.gz`` files; raises :class:`DatasetNotInstalledError`."""
    if path is not None:
        candidates, origin = [os.fspath(path)], "the path argument"
    elif os.environ.get(FASHION_MNIST_ENV):
        candidates, origin = [os.environ[FASHION_MNIST_ENV]], f"${FASHION_MNIST_ENV}"
    else:
        candidates, origin = [FASHION_MNIST_SYSTEM_DIR, fashion_mnist_cache_dir()], "the system location and the user cache"
    for where in candidates:
        for d in (where, os.path.join(where, _DEB_SUBDIR)):
            if _has_files(d):
                return d
    shown = " or ".join(repr(c) for c in candidates)
    raise DatasetNotInstalledError(
        f"Fashion-MNIST idx files not found in {shown} ({origin}). "
        f"Install the Debian package:  {INSTALL_FASHION_MNIST}"
    )


def fetch_fashion_mnist(target: str | os.PathLike | None = None) -> str:
    """Make Fashion-MNIST available without root; returns the folder holding it.

    A no-op when :func:`fashion_mnist_dir` already finds it (system package, the cache, or
    ``$LAVA_FASHION_MNIST_DIR``).  Otherwise ``apt-get download dataset-fashion-mnist`` and
    ``dpkg-deb -x`` unpack it into ``target`` (default: :func:`fashion_mnist_cache_dir`).
    """
    if target is None:
        try:
            return fashion_mnist_dir()
        except DatasetNotInstalledError:
            target = fashion_mnist_cache_dir()
    target = os.fspath(target)
    if _has_files(target):
        return target
    fetch_debian_package("dataset-fashion-mnist", _DEB_SUBDIR, target)
    if not _has_files(target):
        raise DatasetNotInstalledError(f"dataset-fashion-mnist unpacked into {target!r} lacks the idx files")
    return target


def _read_idx(path: str, magic: int, header: int, expected: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    found = int.from_bytes(raw[:4], "big")
    n = int.from_bytes(raw[4:8], "big")
    if found != magic or n != expected:
        raise DatasetNotInstalledError(
            f"{path!r} is not a Fashion-MNIST idx file (magic {found}, count {n}); "
            f"reinstall:  {INSTALL_FASHION_MNIST}"
        )
    return np.frombuffer(raw, np.uint8, offset=header)


@functools.lru_cache(maxsize=4)
def _load(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    img_file, lbl_file, n = _FILES[split]
    images = _read_idx(os.path.join(directory, img_file), 2051, 16, n).reshape(n, 28, 28)
    labels = _read_idx(os.path.join(directory, lbl_file), 2049, 8, n).astype(np.int64)
    labels.flags.writeable = False
    return images, labels  # both read-only: the cache hands out the same arrays


def load_fashion_mnist(
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    path: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 28, 28]`` and labels ``int64 [N]`` (0..9, see ``FASHION_MNIST_CLASSES``).

    ``split`` is ``"train"`` (60,000) or ``"test"`` (10,000).  With ``n``, a deterministic
    random subset of that size (drawn with ``seed``) is returned; otherwise the whole
    split in file order.  The returned arrays are fresh copies the caller may modify.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = _load(fashion_mnist_dir(path), split)
    if n is None:
        return images.copy(), labels.copy()
    if not 0 <= n <= len(labels):
        raise ValueError(f"n={n} but the {split} split has {len(labels)} images")
    idx = np.random.default_rng(seed).permutation(len(labels))[:n]
    return images[idx], labels[idx]

