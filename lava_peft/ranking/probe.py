"""Linear probe baseline: ridge regression from mean-pooled frozen image-tower tokens to the target.

    w = argmin ‖[X 1] w − y‖² + λ‖w_X‖²     (X standardised per feature; the bias is not penalised)

``λ`` is chosen on a held-out fifth of the training set from a log grid, then the probe is
refit on the whole training set.  It sees no text, which is fine for single-instruction tasks.
"""

from __future__ import annotations

import torch

from .metrics import ranking_metrics

__all__ = ["fit_ridge", "linear_probe", "pooled_features"]

LAMBDAS = tuple(10.0 ** k for k in range(-2, 5))


def pooled_features(image_tokens: torch.Tensor) -> torch.Tensor:
    """``[N, P, C] -> [N, C]`` (mean over tokens, float64)."""
    return image_tokens.double().mean(1)


def fit_ridge(x: torch.Tensor, y: torch.Tensor, lam: float):
    """``predict(x_new)`` of the ridge fit above (float64 closed form)."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    xs = (x - mean) / std
    a = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], 1)
    reg = torch.eye(a.shape[1], dtype=a.dtype) * lam
    reg[-1, -1] = 0.0
    w = torch.linalg.solve(a.T @ a + reg, a.T @ y.double())

    def predict(x_new: torch.Tensor) -> torch.Tensor:
        z = (x_new.double() - mean) / std
        return torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1) @ w

    return predict


def linear_probe(train_tokens, train_y, eval_tokens, eval_y, integer_targets: bool = True, seed: int = 0) -> dict:
    """Eval metrics of the ridge probe, plus the chosen ``lambda``."""
    x, y = pooled_features(train_tokens), torch.as_tensor(train_y).double()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    hold, fit = perm[: len(x) // 5], perm[len(x) // 5:]
    errors = {lam: float(((fit_ridge(x[fit], y[fit], lam)(x[hold]) - y[hold]) ** 2).mean()) for lam in LAMBDAS}
    best = min(errors, key=errors.get)
    pred = fit_ridge(x, y, best)(pooled_features(eval_tokens))
    return {**ranking_metrics(pred, eval_y, integer_targets), "lambda": best}
