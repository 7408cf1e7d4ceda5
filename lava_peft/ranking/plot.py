"""PNG of a ranking model's eval predictions: predicted vs true score, and a strip of images in model order.

Top: one dot per eval image (true target on x, predicted score on y, the diagonal for
reference, PLCC / SRCC in the title).  Bottom: ``strip`` eval images picked at evenly
spaced predicted ranks, left (lowest score) to right (highest), each labelled with its true
target, so one sees at a glance whether the order is right.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import LavaError
from .metrics import plcc, srcc

__all__ = ["plot_ranking"]


def plot_ranking(images: np.ndarray, targets, scores, out: str | os.PathLike, strip: int = 10,
                 title: str | None = None) -> Path:
    """Draw the figure described above for ``images uint8 [N, H, W]`` and write it to ``out``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LavaError("plotting needs matplotlib: pip install 'matplotlib>=3.7'") from None
    targets = np.asarray(targets, dtype=np.float64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not len(images) == len(targets) == len(scores) or len(scores) < 2:
        raise LavaError(f"plot_ranking needs >= 2 images with one target and one score each; got "
                        f"{len(images)} images, {len(targets)} targets, {len(scores)} scores")
    strip = max(2, min(strip, len(scores)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = plt.figure(figsize=(max(8, 1.1 * strip), 7.5), dpi=100)
    grid = fig.add_gridspec(2, strip, height_ratios=[3.2, 1.0])
    ax = fig.add_subplot(grid[0, :])
    jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(targets)) if np.allclose(targets, targets.round()) else 0
    ax.scatter(targets + jitter, scores, s=8, alpha=0.5)
    lo, hi = min(targets.min(), scores.min()), max(targets.max(), scores.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="predicted = true")
    ax.set_xlabel("true target")
    ax.set_ylabel("predicted score")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    stats = f"PLCC {plcc(scores, targets):.3f}, SRCC {srcc(scores, targets):.3f} (n={len(scores)} eval images)"
    ax.set_title(f"{title}: {stats}" if title else stats)
    order = np.argsort(scores, kind="stable")
    picks = order[np.linspace(0, len(order) - 1, strip).round().astype(int)]
    for k, idx in enumerate(picks):
        sub = fig.add_subplot(grid[1, k])
        sub.imshow(images[idx], cmap="gray", vmin=0, vmax=255)
        sub.set_xticks([])
        sub.set_yticks([])
        sub.set_title(f"true {targets[idx]:.3g}\npred {scores[idx]:.2f}", fontsize=8)
    fig.text(0.5, 0.01, "eval images ordered by predicted score (low → high)", ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
