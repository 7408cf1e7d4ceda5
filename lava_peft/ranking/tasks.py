"""Ranking tasks built from small grey glyphs (Fashion-MNIST items; any ``uint8 [N, h, w]`` works).

Every sample is a canvas, one text instruction and a target score:

* ``rank-count``: 1–9 items scattered over a 4×4 grid; "how many items are in the picture";
  target = the number of items.
* ``rank-count-class``: items of two classes, 1–7 of each; "how many <class> are in the
  picture" naming one of the two at random; target = that class's count (so the same picture
  has two answers and the text decides which).
* ``rank-scale`` / ``rank-rotation`` / ``rank-brightness``: one item, with a continuous
  attribute drawn uniformly; target in [0, 10]: size (10 × fraction of the canvas, 3.5–10),
  angle (degrees / 10, 0–9) or brightness (10 × intensity, 2–10).

Train canvases use glyphs of the train split and eval canvases those of the test split, so
no item image is shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LavaConfigError

__all__ = ["ATTRIBUTES", "TASKS", "RankingTask", "build_task", "load_fashion_glyphs", "render_attribute",
           "render_count"]

ATTRIBUTES = ("scale", "rotation", "brightness")
TASKS = ("rank-count", "rank-count-class") + tuple(f"rank-{a}" for a in ATTRIBUTES)
GRID = 4
PAD = 4
ATTRIBUTE_TEXT = {
    "scale": "how large is the item in the picture",
    "rotation": "how far is the item rotated clockwise",
    "brightness": "how bright is the item in the picture",
}
COUNT_TEXT = "how many items are in the picture"


@dataclass
class RankingTask:
    """Canvases ``uint8 [N, H, W]``, texts and float targets for train and eval."""

    name: str
    train_images: np.ndarray
    train_texts: list[str]
    train_targets: np.ndarray
    eval_images: np.ndarray
    eval_texts: list[str]
    eval_targets: np.ndarray
    integer_targets: bool
    info: dict = field(default_factory=dict)


def _place(canvas: np.ndarray, glyph: np.ndarray, top: int, left: int) -> None:
    h, w = glyph.shape
    region = canvas[top:top + h, left:left + w]
    np.maximum(region, glyph, out=region)


def _count_canvas(glyphs: np.ndarray, picks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``len(picks)`` glyphs in distinct cells of a GRID×GRID layout, jittered by up to PAD px."""
    h, w = glyphs.shape[1:]
    cell_h, cell_w = h + PAD, w + PAD
    canvas = np.zeros((GRID * cell_h, GRID * cell_w), np.uint8)
    cells = rng.choice(GRID * GRID, size=len(picks), replace=False)
    for cell, g in zip(cells, picks):
        r, c = divmod(int(cell), GRID)
        glyph = (glyphs[g].astype(np.float32) * rng.uniform(0.6, 1.0)).astype(np.uint8)
        _place(canvas, glyph, r * cell_h + int(rng.integers(0, PAD + 1)), c * cell_w + int(rng.integers(0, PAD + 1)))
    return canvas


def render_count(glyphs: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator,
                 class_names: tuple[str, ...] | None = None, max_count: int = 9, max_per_class: int = 7):
    """Count canvases: ``(images, texts, targets)``; with ``class_names``, the class-conditioned variant."""
    images, texts, targets = [], [], []
    by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    for _ in range(n):
        if class_names is None:
            k = int(rng.integers(1, max_count + 1))
            picks = rng.integers(0, len(glyphs), size=k)
            texts.append(COUNT_TEXT)
            targets.append(k)
        else:
            a, b = rng.choice(sorted(by_class), size=2, replace=False)
            ka, kb = (int(v) for v in rng.integers(1, max_per_class + 1, size=2))
            picks = np.concatenate([rng.choice(by_class[int(a)], ka), rng.choice(by_class[int(b)], kb)])
            asked, count = (a, ka) if rng.random() < 0.5 else (b, kb)
            texts.append(f"how many {class_names[int(asked)].lower()} are in the picture")
            targets.append(count)
        images.append(_count_canvas(glyphs, picks, rng))
    return np.stack(images), texts, np.asarray(targets, np.float32)


def _transform(glyph: torch.Tensor, size: int, scale: float, angle_deg: float, top: int, left: int) -> torch.Tensor:
    """One glyph ``[h, w]`` (float) scaled to ``scale·size`` px, rotated clockwise, placed on a ``size²`` canvas."""
    side = max(4, int(round(scale * size)))
    g = F.interpolate(glyph[None, None], size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    if angle_deg:
        a = math.radians(angle_deg)  # grid_sample's output pixel (x, y) reads the input at R(-a)·(x, y)
        theta = torch.tensor([[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0]])
        grid = F.affine_grid(theta[None], list(g.shape), align_corners=False)
        g = F.grid_sample(g, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    canvas = torch.zeros(size, size)
    canvas[top:top + side, left:left + side] = g[0, 0]
    return canvas


def render_attribute(glyphs: np.ndarray, attribute: str, n: int, rng: np.random.Generator, size: int = 64):
    """Single-item canvases with a continuous ``attribute``: ``(images, texts, targets in [0, 10])``."""
    if attribute not in ATTRIBUTES:
        raise LavaConfigError(f"attribute must be one of {ATTRIBUTES}; got {attribute!r}")
    images, targets = [], []
    for _ in range(n):
        glyph = torch.from_numpy(glyphs[int(rng.integers(0, len(glyphs)))].astype(np.float32))
        scale = rng.uniform(0.35, 1.0) if attribute == "scale" else 0.7
        angle = rng.uniform(0.0, 90.0) if attribute == "rotation" else 0.0
        bright = rng.uniform(0.2, 1.0) if attribute == "brightness" else 1.0
        side = max(4, int(round(scale * size)))
        top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        canvas = _transform(glyph, size, scale, angle, top, left) * bright
        images.append(canvas.clamp(0, 255).round().to(torch.uint8).numpy())
        targets.append({"scale": 10 * scale, "rotation": angle / 10, "brightness": 10 * bright}[attribute])
    return np.stack(images), [ATTRIBUTE_TEXT[attribute]] * n, np.asarray(targets, np.float32)


def load_fashion_glyphs(split: str, n: int | None = None, seed: int = 0, path=None):
    """Fashion-MNIST items ``(uint8 [N, 28, 28], labels, class names)``; ``path`` or
    ``$LAVA_FASHION_MNIST_DIR`` point at an unpacked ``dataset-fashion-mnist`` package."""
    from ..data import FASHION_MNIST_CLASSES, load_fashion_mnist

    images, labels = load_fashion_mnist(split, n=n, seed=seed, path=path)
    return images, labels, FASHION_MNIST_CLASSES


def build_task(name: str, n_train: int, n_eval: int, seed: int = 0, glyphs=None, path=None) -> RankingTask:
    """A task by name.  ``glyphs``: ``((train_images, train_labels), (eval_images, eval_labels),
    class_names)`` to use instead of Fashion-MNIST (tests use sklearn digits or drawn shapes)."""
    if name not in TASKS:
        raise LavaConfigError(f"unknown ranking task {name!r}; choose one of {TASKS}")
    if n_train < 2 or n_eval < 2:
        raise LavaConfigError(f"n_train and n_eval must be >= 2 (pairs need two images); got {n_train}, {n_eval}")
    if glyphs is None:
        tr_img, tr_lab, names = load_fashion_glyphs("train", n=min(60000, 20 * n_train), seed=seed, path=path)
        ev_img, ev_lab, _ = load_fashion_glyphs("test", n=min(10000, 20 * n_eval), seed=seed, path=path)
    else:
        (tr_img, tr_lab), (ev_img, ev_lab), names = glyphs
    rng_tr, rng_ev = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    if name in ("rank-count", "rank-count-class"):
        cls = names if name == "rank-count-class" else None
        train = render_count(tr_img, tr_lab, n_train, rng_tr, cls)
        evals = render_count(ev_img, ev_lab, n_eval, rng_ev, cls)
        integer = True
    else:
        attribute = name.removeprefix("rank-")
        train = render_attribute(tr_img, attribute, n_train, rng_tr)
        evals = render_attribute(ev_img, attribute, n_eval, rng_ev)
        integer = False
    return RankingTask(name, train[0], train[1], train[2], evals[0], evals[1], evals[2], integer,
                       {"seed": seed, "n_train": n_train, "n_eval": n_eval, "glyphs": "custom" if glyphs else "fashion-mnist"})
