"""Ranking metrics: PLCC, SRCC, pairwise accuracy, MAE.

* PLCC: Pearson correlation of scores and targets.
* SRCC: Spearman correlation = Pearson of the average ranks (ties share their mean rank).
* pairwise accuracy: over all pairs ``i < j`` with ``y_i ≠ y_j``, the fraction ordered like the
  targets, ``sign(s_i − s_j) = sign(y_i − y_j)``; a tie in the scores counts ½.
* MAE: ``mean |s − y|`` (reported for tasks with integer targets, e.g. counts).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["average_ranks", "pairwise_accuracy", "plcc", "ranking_metrics", "srcc"]


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def plcc(scores, targets) -> float:
    s, y = _np(scores), _np(targets)
    s, y = s - s.mean(), y - y.mean()
    denom = np.sqrt((s * s).sum() * (y * y).sum())
    return float((s * y).sum() / denom) if denom > 0 else 0.0


def average_ranks(x) -> np.ndarray:
    """Ranks 1..n; tied values get the mean of the ranks they span."""
    x = _np(x)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(len(x))
    start = 0
    while start < len(x):
        stop = start
        while stop + 1 < len(x) and sorted_x[stop + 1] == sorted_x[start]:
            stop += 1
        ranks[order[start:stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def srcc(scores, targets) -> float:
    return plcc(average_ranks(scores), average_ranks(targets))


def pairwise_accuracy(scores, targets) -> float:
    s, y = _np(scores), _np(targets)
    ds = np.sign(s[:, None] - s[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    upper = np.triu(np.ones_like(dy, dtype=bool), 1) & (dy != 0)
    if not upper.any():
        return 0.0
    agree = np.where(ds == 0, 0.5, (ds == dy).astype(np.float64))
    return float(agree[upper].mean())


def ranking_metrics(scores, targets, integer_targets: bool = True) -> dict[str, float]:
    """``{"plcc", "srcc", "pairwise_accuracy"[, "mae"]}``."""
    out = {"plcc": plcc(scores, targets), "srcc": srcc(scores, targets),
           "pairwise_accuracy": pairwise_accuracy(scores, targets)}
    if integer_targets:
        out["mae"] = float(np.abs(_np(scores) - _np(targets)).mean())
    return out
