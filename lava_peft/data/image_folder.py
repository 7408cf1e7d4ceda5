"""An image folder in the class-per-subfolder layout: ``root/<class name>/<image file>``.

    photos/
      cat/ 001.jpg 002.png ...
      dog/ a.jpg ...

Classes are the sub-folder names in sorted order (class ``i`` = ``names[i]``).  Images are
read with Pillow (a dependency of matplotlib, already installed with the ``plot`` extra),
converted to RGB, and resized to ``size × size`` with ImageNet normalisation by
:func:`~lava_peft.data.images.to_image_tensor`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .images import to_image_tensor
from .user_files import UserDataError

__all__ = ["IMAGE_SUFFIXES", "is_image_folder", "list_image_folder", "load_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_image_folder(path: str | Path) -> bool:
    """True if ``path`` is a folder whose sub-folders hold image files (and it is no saved data set)."""
    p = Path(path).expanduser()
    if not p.is_dir() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
        return False
    return any(f.suffix.lower() in IMAGE_SUFFIXES for d in p.iterdir() if d.is_dir() for f in d.iterdir())


def list_image_folder(path: str | Path, class_names: tuple[str, ...] | None = None) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """``(files, class ids, class names)``.  With ``class_names`` (held-out data), the folder's
    classes must be among them and keep their ids."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserDataError(f"image folder {str(root)!r} does not exist")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    found = {d.name: sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
             for d in folders}
    found = {name: files for name, files in found.items() if files}
    if class_names is None:
        if len(found) < 2:
            raise UserDataError(f"{root} has {len(found)} sub-folder(s) with images ({', '.join(found) or 'none'}); "
                                "a classifier needs at least two classes: one sub-folder of images per class")
        class_names = tuple(sorted(found))
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise UserDataError(f"{root} has classes {unknown} that the training images do not have "
                                f"({list(class_names)}); held-out images may only use training classes")
    ids = {name: i for i, name in enumerate(class_names)}
    files, labels = [], []
    for name, paths in found.items():
        files.extend(paths)
        labels.extend([ids[name]] * len(paths))
    if not files:
        raise UserDataError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its sub-folders")
    return files, labels, class_names


def load_images(files: list[Path], size: int) -> torch.Tensor:
    """``[N, 3, size, size]`` normalised float images; an unreadable file is named in the error."""
    try:
        from PIL import Image
    except ImportError:
        raise UserDataError("reading an image folder needs Pillow: pip install 'pillow>=9'") from None
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - Pillow raises several types for bad files
            raise UserDataError(f"{f}: unreadable image ({exc}); remove or replace the file") from None
        out.append(to_image_tensor(arr, size=size))
    return torch.cat(out)
