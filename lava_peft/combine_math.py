"""The numerics behind adapter combination: SVD of a low-rank product, CP-ALS, TIES/DARE rules.

Pure tensor functions (no model, no adapters); :mod:`lava_peft.combine` applies them per
layer.  The maths is described in :mod:`lava_peft.combine`'s docstring.
"""

from __future__ import annotations

import math
import string
from typing import Sequence

import torch

def truncated_svd_of_product(up: torch.Tensor, down: torch.Tensor, rank: int):
    """``U_R, S_R, V_Rᵀ`` of ``up @ down`` from thin QRs of the factors (never forms the product).

    ``up = Q1 R1``, ``downᵀ = Q2 R2`` ⇒ ``up @ down = Q1 (R1 R2ᵀ) Q2ᵀ``; the SVD of the small
    core gives the singular triplets.  Computed in float64.
    """
    q1, r1 = torch.linalg.qr(up.double())
    q2, r2 = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    u, s, vh = q1 @ u, s, vh @ q2.T
    return _pad_svd(u, s, vh, rank)


def truncated_svd(matrix: torch.Tensor, rank: int):
    """``U_R, S_R, V_Rᵀ`` of a dense matrix (float64)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return _pad_svd(u, s, vh, rank)


def _pad_svd(u, s, vh, rank):
    """Keep ``rank`` triplets; if fewer exist, complete ``U``/``Vᵀ`` orthonormally with ``S = 0``."""
    k = min(rank, s.shape[0])
    u, s, vh = u[:, :k], s[:k], vh[:k]
    if k < rank:
        gen = torch.Generator().manual_seed(0)
        extra_u = _orth_complement(u, rank - k, gen)
        extra_v = _orth_complement(vh.T, rank - k, gen)
        u = torch.cat([u, extra_u], dim=1)
        vh = torch.cat([vh, extra_v.T], dim=0)
        s = torch.cat([s, s.new_zeros(rank - k)])
    return u, s, vh


def _orth_complement(basis: torch.Tensor, extra: int, gen: torch.Generator) -> torch.Tensor:
    g = torch.randn(basis.shape[0], extra, generator=gen, dtype=basis.dtype)
    g = g - basis @ (basis.T @ g)
    q, _ = torch.linalg.qr(g)
    return q


def cp_als(
    tensor: torch.Tensor,
    rank: int,
    init: Sequence[torch.Tensor] | None = None,
    n_iter: int = 200,
    tol: float = 1e-10,
    seed: int = 0,
) -> tuple[list[torch.Tensor], float]:
    """Rank-``R`` CP decomposition ``T ≈ Σ_j a^{(0)}_j ⊗ … ⊗ a^{(M-1)}_j`` by alternating least squares.

    Each sweep solves, for every mode ``m``, the linear least-squares problem
    ``A^{(m)} = T_(m) (⊙_{n≠m} A^{(n)}) (⊛_{n≠m} A^{(n)ᵀ}A^{(n)})^+`` (MTTKRP times the
    pseudo-inverse of the Hadamard product of Gram matrices), which never increases
    ``‖T − T̂‖``.  Columns of modes ``1…M−1`` are normalised to unit length after every
    sweep, the norms going into mode 0.  Stops after ``n_iter`` sweeps or when the
    relative error improves by less than ``tol``.

    Args:
        tensor: the tensor (any number of modes ≥ 2).
        init: optional factors ``(d_m, R)`` to start from (else Gaussian, seeded).
    Returns:
        ``(factors, relative_error)`` with ``factors[m]`` of shape ``(d_m, R)`` (float64)
        and ``relative_error = ‖T − T̂‖_F / ‖T‖_F``.
    """
    t = tensor.double()
    n_modes = t.dim()
    letters = string.ascii_lowercase[:n_modes]
    if init is None:
        gen = torch.Generator().manual_seed(seed)
        factors = [torch.randn(d, rank, generator=gen, dtype=torch.float64) for d in t.shape]
    else:
        factors = [f.double().clone() for f in init]
    norm_t = t.norm()
    if norm_t == 0:
        return [torch.zeros(d, rank, dtype=torch.float64) for d in t.shape], 0.0
    prev = math.inf
    err = math.inf
    for _ in range(n_iter):
        for m in range(n_modes):
            others = [n for n in range(n_modes) if n != m]
            eq = f"{letters}," + ",".join(f"{letters[n]}z" for n in others) + f"->{letters[m]}z"
            mttkrp = torch.einsum(eq, t, *(factors[n] for n in others))
            gram = torch.ones(rank, rank, dtype=torch.float64)
            for n in others:
                gram = gram * (factors[n].T @ factors[n])
            factors[m] = mttkrp @ torch.linalg.pinv(gram, hermitian=True)
        for m in range(1, n_modes):
            norms = factors[m].norm(dim=0).clamp_min(1e-300)
            factors[m] = factors[m] / norms
            factors[0] = factors[0] * norms
        recon = torch.einsum(",".join(f"{c}z" for c in letters) + f"->{letters}", *factors)
        err = ((t - recon).norm() / norm_t).item()
        if prev - err < tol:
            break
        prev = err
    return factors, err


# =============================================================================== dense rules
def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``⌊d·numel⌋`` largest ``|t|`` (``torch.topk`` over the flattened tensor, as PEFT)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    flat = t.reshape(-1)
    mask = torch.zeros_like(flat)
    if k > 0:
        mask[torch.topk(flat.abs(), k=k).indices] = 1
    return t * mask.view_as(t)


def _dare_prune(t: torch.Tensor, density: float, gen: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability ``d``, rescale by ``1/d``.

    The mask is ``torch.bernoulli(full_like(t, d))`` — the draw PEFT makes (from its global
    generator) — so a generator in the same state gives PEFT's mask bit for bit.  No draw at
    ``d ≥ 1`` (nothing is pruned), as in PEFT.
    """
    if density >= 1:
        return t
    keep = torch.bernoulli(torch.full_like(t, density), generator=gen)
    return t * keep / density


def _disjoint_merge(tau: torch.Tensor, w: torch.Tensor, majority_sign_method: str) -> torch.Tensor:
    """TIES: elect ``σ`` from the *unweighted* pruned tensors, average the weighted ones that agree."""
    sign = tau.sign()
    elected = tau.sum(0) if majority_sign_method == "total" else sign.sum(0)
    majority = torch.where(elected >= 0, 1.0, -1.0).to(tau.dtype)
    agree = sign == majority
    merged = (tau * w * agree).sum(0)
    return merged / agree.sum(0).clamp(min=1).to(tau.dtype)


def combine_dense(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    combination_type: str,
    density: float = 1.0,
    generator: torch.Generator | None = None,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """One combination rule (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``)
    of task tensors, with PEFT's definitions (``peft.utils.merge_utils``); DARE masks are drawn
    tensor by tensor in the given order.  The weights become a tensor of the tensors' dtype."""
    w = torch.tensor(list(weights), dtype=tensors[0].dtype).view(-1, *([1] * tensors[0].dim()))
    if combination_type in ("linear", "svd"):
        return (torch.stack(list(tensors)) * w).sum(0)
    if combination_type in ("ties", "magnitude_prune"):
        tau = torch.stack([_magnitude_prune(t, density) for t in tensors])
    else:
        tau = torch.stack([_dare_prune(t, density, generator) for t in tensors])
    if combination_type in ("magnitude_prune", "dare_linear"):
        return (tau * w).sum(0)
    return _disjoint_merge(tau, w, majority_sign_method)


def peft_svd(matrix: torch.Tensor, rank: int, clamp: float | None = None, full_matrices: bool = True,
             driver: str | None = None):
    """PEFT's SVD refit of a combined ``ΔW`` (``O × I·ΠK``), step for step, in the matrix's dtype.

    ``U S Vᵀ = svd(ΔW)``; ``B = U_R S_R``, ``A = V_Rᵀ``; with ``clamp = q`` both are clipped
    to ``[−h, h]``, ``h`` the ``q``-quantile of the entries of ``B`` and ``A`` together.  The
    clamp depends on the singular vectors' signs, so this runs the same ``torch.linalg.svd``
    on the same fp32 matrix as PEFT instead of the float64 :func:`truncated_svd`.
    Returns ``(B, A)``.
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=full_matrices, driver=driver)
    up = u[:, :rank] @ torch.diag(s[:rank])
    down = vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), clamp)
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    return up, down
