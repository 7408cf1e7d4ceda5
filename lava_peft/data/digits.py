"""scikit-learn's 8x8 hand-written digits (1,797 images, 10 classes): a seconds-long vision task."""

from __future__ import annotations

import numpy as np

from ._errors import DatasetNotInstalledError

__all__ = ["INSTALL_SKLEARN", "load_digits_split"]

INSTALL_SKLEARN = "pip install 'scikit-learn>=1.3,<2'"


def load_digits_split(
    test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified split: ``(x_train, y_train, x_test, y_test)``.

    Images are ``float32 [N, 8, 8]`` scaled to [0, 1] (raw values are 0..16), labels
    ``int64 [N]``.  Each class is shuffled with ``seed`` and ``round(test_fraction * n_c)``
    of its images go to the test side (359 test / 1,438 train at the default 0.2).
    Raises :class:`DatasetNotInstalledError` if scikit-learn is missing.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DatasetNotInstalledError(
            f"The digits data set comes with scikit-learn, which is not installed. "
            f"Install it with:  {INSTALL_SKLEARN}"
        ) from e
    d = load_digits()
    x = (np.asarray(d.images, dtype=np.float32) / 16.0)
    y = np.asarray(d.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_idx.append(idx[: int(round(test_fraction * len(idx)))])
    test = np.sort(np.concatenate(test_idx))
    train = np.setdiff1d(np.arange(len(y)), test)
    train = train[rng.permutation(len(train))]
    test = test[rng.permutation(len(test))]
    return x[train], y[train], x[test], y[test]
