"""The ranking adapter's loss and its labels.

    L = w_s · log(1 + SmoothL1(s, y))                       (regression, mean over images)
      + w_p · BCEWithLogits(p_ij, 1[y_i > y_j])            (pairs, mean over pairs)
      + w_z · BCEWithLogits(n_i, 1[y_i ≠ 0])               (optional)

with ``w_s = 0.2, w_p = 1.0`` by default.  Ties ``y_i = y_j`` (self-pairs included) get label 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapter import RankingConfig, RankingOutput

__all__ = ["pair_labels", "ranking_loss"]


def pair_labels(targets: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``1[y_i > y_j]`` as floats: ties and self-pairs are 0."""
    return (targets[i] > targets[j]).to(torch.float32)


def ranking_loss(out: RankingOutput, targets: torch.Tensor, config: RankingConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """``(total loss, {"score_loss", "pair_loss", "nonzero_loss"})`` in fp32."""
    y = targets.float()
    score_loss = torch.log1p(F.smooth_l1_loss(out.scores.float(), y))
    total = config.score_weight * score_loss
    parts = {"score_loss": float(score_loss.detach())}
    if out.pair_logits is not None and config.pair_weight > 0:
        pair_loss = F.binary_cross_entropy_with_logits(out.pair_logits.float(), pair_labels(y, out.pair_i, out.pair_j))
        total = total + config.pair_weight * pair_loss
        parts["pair_loss"] = float(pair_loss.detach())
    if out.nonzero_logits is not None and config.nonzero_weight > 0:
        nz = F.binary_cross_entropy_with_logits(out.nonzero_logits.float(), (y != 0).float())
        total = total + config.nonzero_weight * nz
        parts["nonzero_loss"] = float(nz.detach())
    return total, parts
