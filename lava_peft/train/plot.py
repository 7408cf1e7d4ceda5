"""PNG of a run's loss and accuracy curves (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LavaError
from .metrics import read_metrics


def plot_metrics(source: str | os.PathLike, out: str | os.PathLike | None = None, width: int = 1200,
                 height: int = 450, title: str | None = None) -> Path:
    """Draw train/eval loss (left) and eval accuracy (right) vs optimizer step.

    ``source`` is a run directory or a ``metrics.jsonl``; the PNG is ``width × height``
    pixels and goes to ``out`` (default ``<run>/metrics.png``).  Returns its path.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LavaError("plotting needs matplotlib: pip install 'matplotlib>=3.7'") from None
    if width < 200 or height < 150:
        raise LavaError(f"plot size {width}x{height} px is too small; use at least 200x150")
    source = Path(source)
    records = read_metrics(source)
    train = [r for r in records if r.get("split") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("split") == "eval"]
    if not train and not evals:
        raise LavaError(f"{source} holds no train or eval records to plot")
    if out is None:
        out = (source if source.is_dir() else source.parent) / "metrics.png"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dpi = 100
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(width / dpi, height / dpi), dpi=dpi)
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
    ev_loss = [r for r in evals if r.get("loss") is not None]
    if ev_loss:
        ax_loss.plot([r["step"] for r in ev_loss], [r["loss"] for r in ev_loss], "o-", label="eval loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ev_acc = [r for r in evals if r.get("accuracy") is not None]
    tr_acc = [r for r in train if r.get("accuracy") is not None]
    if tr_acc:
        ax_acc.plot([r["step"] for r in tr_acc], [100 * r["accuracy"] for r in tr_acc], color="C0", lw=1.0, alpha=0.6,
                    label="train accuracy (batches)")
    if ev_acc:
        ax_acc.plot([r["step"] for r in ev_acc], [100 * r["accuracy"] for r in ev_acc], "o-", color="C2", label="eval accuracy")
    if ev_acc or tr_acc:
        ax_acc.legend()
    else:
        ax_acc.text(0.5, 0.5, "no accuracy recorded", ha="center", va="center", transform=ax_acc.transAxes)
    ax_acc.set_xlabel("optimizer step")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.grid(alpha=0.3)
    fig.suptitle(title or f"lava-peft run: {source}")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, out)
    return out
