"""Low-bit quantization of adapter tensors (Jie, Wang, Deng, ICCV 2023, arXiv 2307.16867).

Per tensor ``w`` with ``n`` elements and ``k`` bits (1 ≤ k ≤ 8):

1. **Standardize.**  ``μ = mean(w)``, ``σ = std(w)`` (unbiased, ``n − 1``; both fp32),
   ``w̃ = (w − μ)/σ``.
2. **Quantize** ``w̃`` with the 2^k-level Gaussian codebook of :func:`gaussian_codebook`:
   the code of ``w̃`` is the number of thresholds ``≤ w̃`` (a value on a threshold goes
   to the upper level), ``Q(w̃) = level[code]``.
3. **De-standardize.**  ``w_q = Q(w̃)·σ + μ``  (fp32: one multiply, one add).

``σ = 0`` (a constant tensor, e.g. a zero-initialised factor, or ``n = 1``) is defined,
not divided by: every element equals ``μ``, ``w̃ := 0`` and ``w_q = μ`` exactly.  So a
zero tensor quantizes to exactly zero.  (The reference code standardizes with
``σ + 1e-5`` instead; away from ``σ = 0`` the two agree up to that ε.)

**Straight-through estimator.**  :func:`fake_quantize` returns exactly
``dequantize(quantize(w))`` in the forward.  Its backward treats ``Q`` as the identity
and differentiates the rest (``w̃``, ``σ``, ``μ``), as the reference code does with
``w̃ + (Q(w̃) − w̃).detach()``.  Because ``w_q = w + c·σ`` with ``c = Q(w̃) − w̃``
held constant (``μ`` cancels), the gradient is

    ∂L/∂w_j = g_j + (Σ_i g_i c_i) · w̃_j / (n − 1)          (g = ∂L/∂w_q)

i.e. the identity plus the exact derivative of ``σ``.  ``stats_grad=False`` gives the
plain identity ``∂L/∂w = g``.  At ``σ = 0`` both are the identity.

**Codebook.**  Each level is the median of the standard normal restricted to its bin,
and each threshold is the midpoint of its two neighbouring levels:

    t_i = (l_i + l_{i+1}) / 2,     l_i = Φ⁻¹((Φ(t_{i−1}) + Φ(t_i)) / 2),   t_{−1} = −∞, t_{2^k−1} = +∞

(this is the reference code's fixed point; note it is the *median* rule, not Lloyd–Max's
centroid rule: 1 bit gives ±Φ⁻¹(0.75) = ±0.6745, not ±√(2/π) = ±0.7979).  It is
solved once per ``k`` in float64 by Newton's method from the equal-probability medians,
made exactly antisymmetric, cached, and used in fp32.  (The reference code runs 500
plain fixed-point steps from zero, which converge for k ≤ 3 but not for k ≥ 4.)

**Storage.**  Codes are bit-packed into a little-endian bit stream (:func:`pack_codes`):
code ``i`` occupies stream bits ``i·k … i·k + k − 1`` (its least significant bit
first), and stream bit ``b`` is bit ``b mod 8`` (LSB = 0) of byte ``b // 8``; the
last byte is zero-padded.  For ``k`` dividing 8 this is the reference code's byte
layout.  A tensor is stored as ``ceil(n·k/8)`` bytes plus ``(μ, σ)`` in fp32
(:func:`quantize_for_storage`); :func:`dequantize_from_storage` gives back exactly the
:func:`fake_quantize` forward value (same device type: the same fp32 operations run).

Everything is plain torch (no numpy, no pickles); the tensors are safetensors-ready.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from .errors import LavaConfigError

MAX_BITS = 8


def check_bits(bits) -> int:
    """``bits`` as an int in 1..8, or a :class:`LavaConfigError` saying what to use."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise LavaConfigError(
            f"bits must be an integer from 1 to {MAX_BITS} (bits stored per adapter weight); got {bits!r}"
        )
    return bits


# ============================================================================ codebook
class Codebook(NamedTuple):
    """The ``2^k`` levels (ascending) and ``2^k − 1`` thresholds of :func:`gaussian_codebook`, float64."""

    bits: int
    levels: tuple[float, ...]
    thresholds: tuple[float, ...]


def _median_map(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G(l), t)``: the bin medians of N(0, 1) for the thresholds ``t`` = midpoints of ``l``."""
    thresholds = (levels[1:] + levels[:-1]) / 2
    cdf = torch.cat([levels.new_zeros(1), torch.special.ndtr(thresholds), levels.new_ones(1)])
    return torch.special.ndtri((cdf[1:] + cdf[:-1]) / 2), thresholds


@functools.lru_cache(maxsize=None)
def gaussian_codebook(bits: int) -> Codebook:
    """The Gaussian codebook for ``bits`` (see the module docstring), computed once and cached.

    Newton's method on ``F(l) = l − G(l)`` with the tridiagonal Jacobian
    ``∂G_i/∂l_{i−1} = φ(t_{i−1})/(4φ(G_i))``, ``∂G_i/∂l_{i+1} = φ(t_i)/(4φ(G_i))``,
    ``∂G_i/∂l_i`` their sum; float64 on the CPU, deterministic.
    """
    bits = check_bits(bits)
    n = 2**bits
    f64 = torch.float64
    cpu = torch.device("cpu")  # the same float64 arithmetic whatever the default device
    levels = torch.special.ndtri((torch.arange(n, dtype=f64, device=cpu) + 0.5) / n)  # equal-probability medians
    pdf = lambda x: torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)  # noqa: E731
    idx = torch.arange(n, device=cpu)
    for _ in range(50):
        g, t = _median_map(levels)
        phi_t = torch.cat([levels.new_zeros(1), pdf(t), levels.new_zeros(1)])  # φ(t_{-1}) … φ(t_{n-1})
        denom = 4 * pdf(g)
        jac = torch.eye(n, dtype=f64, device=cpu)
        jac[idx, idx] -= (phi_t[:-1] + phi_t[1:]) / denom
        jac[idx[1:], idx[1:] - 1] -= phi_t[1:-1] / denom[1:]
        jac[idx[:-1], idx[:-1] + 1] -= phi_t[1:-1] / denom[:-1]
        step = torch.linalg.solve(jac, levels - g)
        levels = levels - step
        levels = (levels - levels.flip(0)) / 2  # exactly antisymmetric: the middle threshold is exactly 0
        if float(step.abs().max()) < 1e-12:
            break
    thresholds = (levels[1:] + levels[:-1]) / 2
    return Codebook(bits, tuple(levels.tolist()), tuple(thresholds.tolist()))


REFERENCE_STEPS = 500
CODEBOOKS = ("exact", "reference")


@functools.lru_cache(maxsize=None)
def reference_codebook(bits: int) -> Codebook:
    """The codebook the reference code (PETL-ViT ``binary_adapter``) uses: :data:`REFERENCE_STEPS` plain
    fixed-point steps ``t ← midpoints(l)``, ``l ← G(l)`` (the median map of the module docstring) from
    all-zero levels, float64.  Its thresholds are those of the *last* step, i.e. the midpoints of the
    levels before the final update, as in the reference.  For ``k ≤ 4`` it equals
    :func:`gaussian_codebook` to ~1e-8; from ``k = 5`` on the iteration has not converged
    (max level difference ≈ 0.015 at 5 bits, ≈ 1.6 at 8 bits) and these are different numbers.
    """
    bits = check_bits(bits)
    levels = torch.zeros(2**bits, dtype=torch.float64)
    thresholds = levels[1:]
    for _ in range(REFERENCE_STEPS):
        levels, thresholds = _median_map(levels)
    return Codebook(bits, tuple(levels.tolist()), tuple(thresholds.tolist()))


def check_codebook(codebook) -> str:
    if codebook not in CODEBOOKS:
        raise LavaConfigError(
            f"codebook must be 'exact' (the converged Gaussian-median codebook) or 'reference' (the reference "
            f"code's {REFERENCE_STEPS}-step fixed-point values; they differ from 5 bits on); got {codebook!r}"
        )
    return codebook


_TENSORS: dict[tuple[int, torch.device, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _codebook_tensors(bits: int, device: torch.device, codebook: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(levels, thresholds)`` on ``device``, cached (private: shared, never modified)."""
    found = _TENSORS.get((bits, device, codebook))
    return found if found is not None else _make_codebook_tensors(bits, device, codebook)


@torch.compiler.disable  # solved eagerly once, never traced by torch.compile
def _make_codebook_tensors(bits: int, device: torch.device, codebook: str) -> tuple[torch.Tensor, torch.Tensor]:
    book = gaussian_codebook(bits) if check_codebook(codebook) == "exact" else reference_codebook(bits)
    found = _TENSORS[(bits, device, codebook)] = (
        torch.tensor(book.levels, dtype=torch.float32, device=device),
        torch.tensor(book.thresholds, dtype=torch.float32, device=device))
    return found


# ============================================================================ quantize
def quantize(w: torch.Tensor, bits: int, codebook: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, stats)``: ``codes`` uint8 of ``w``'s shape (values ``0 … 2^k − 1``), ``stats`` =
    fp32 ``[μ, σ]``.  No gradient."""
    bits = check_bits(bits)
    if not w.is_floating_point() or w.numel() == 0:
        raise LavaConfigError(
            f"quantize needs a non-empty floating-point tensor; got {w.dtype} of shape {tuple(w.shape)}"
        )
    w32 = w.detach().float()
    mu = w32.mean()
    sigma = w32.std() if w32.numel() > 1 else torch.zeros_like(mu)
    z = (w32 - mu) / torch.where(sigma > 0, sigma, torch.ones_like(sigma))  # σ = 0: every w − μ is 0
    _, thresholds = _codebook_tensors(bits, w32.device, codebook)
    codes = torch.bucketize(z, thresholds, right=True).to(torch.uint8)
    return codes, torch.stack([mu, sigma])


def dequantize(codes: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, bits: int,
               codebook: str = "exact") -> torch.Tensor:
    """``level[codes]·σ + μ`` in fp32 (the shape of ``codes``)."""
    levels, _ = _codebook_tensors(check_bits(bits), codes.device, codebook)
    q = levels.index_select(0, codes.reshape(-1).long()).view(codes.shape)
    return q * sigma + mu


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, bits, stats_grad, codebook="exact"):
        codes, stats = quantize(w, bits, codebook)
        out = dequantize(codes, stats[0], stats[1], bits, codebook).to(w.dtype)
        ctx.stats_grad = stats_grad and w.numel() > 1
        if ctx.stats_grad:
            ctx.save_for_backward(w, out, stats)
        return out

    @staticmethod
    def backward(ctx, grad):
        if not ctx.stats_grad:
            return grad, None, None, None
        w, out, stats = ctx.saved_tensors
        mu, sigma = stats[0], stats[1]
        g32, w32 = grad.float(), w.float()
        safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
        # (Σ g·c)/(n−1)·w̃ with c = Q(w̃) − w̃ = (w_q − w)/σ and w̃ = (w − μ)/σ
        coef = (g32 * (out.float() - w32)).sum() / ((w.numel() - 1) * safe * safe)
        coef = torch.where(sigma > 0, coef, torch.zeros_like(coef))
        return (g32 + coef * (w32 - mu)).to(grad.dtype), None, None, None


def fake_quantize(w: torch.Tensor, bits: int, stats_grad: bool = True, codebook: str = "exact") -> torch.Tensor:
    """``Q(w̃)·σ + μ`` (exactly ``dequantize(*quantize(w))``) with the straight-through gradient.

    ``stats_grad=True`` (the reference code's gradient) adds the derivative through ``σ``;
    ``False`` gives the identity.  ``codebook``: ``"exact"`` or ``"reference"`` (:func:`reference_codebook`).
    See the module docstring.
    """
    check_bits(bits)
    return _FakeQuantize.apply(w, bits, bool(stats_grad), check_codebook(codebook))


# ============================================================================ bit packing
def packed_size(numel: int, bits: int) -> int:
    """Bytes of ``numel`` packed ``bits``-bit codes: ``ceil(numel·bits/8)``."""
    return (numel * check_bits(bits) + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape, flattened in row-major order) into a uint8 tensor of
    ``ceil(n·bits/8)`` bytes, little-endian bit order (module docstring)."""
    bits = check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise LavaConfigError(f"pack_codes needs an integer tensor of codes; got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise LavaConfigError(
            f"codes must lie in 0..{2**bits - 1} for bits={bits}; got values in "
            f"{int(flat.min())}..{int(flat.max())}"
        )
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.clone()
    device = flat.device
    stream = ((flat[:, None] >> torch.arange(bits, dtype=torch.uint8, device=device)) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = torch.arange(8, dtype=torch.uint8, device=device)
    return (stream.view(-1, 8) << weights).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as a 1-D uint8 tensor."""
    bits = check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise LavaConfigError(
            f"packed codes must be a 1-D uint8 tensor; got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    expected = packed_size(numel, bits)
    if packed.numel() != expected:
        raise LavaConfigError(
            f"{numel} codes of {bits} bits take {expected} bytes, but {packed.numel()} were given"
        )
    if bits == 8:
        return packed.clone()
    device = packed.device
    stream = ((packed[:, None] >> torch.arange(8, dtype=torch.uint8, device=device)) & 1).reshape(-1)
    weights = torch.arange(bits, dtype=torch.uint8, device=device)
    return (stream[: numel * bits].view(numel, bits) << weights).sum(dim=1, dtype=torch.uint8)


# ============================================================================ storage
class PackedTensor(NamedTuple):
    """A tensor as stored: ``packed`` uint8 codes, fp32 0-d ``mu`` / ``sigma``, original ``shape``."""

    packed: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    shape: torch.Size


def quantize_for_storage(w: torch.Tensor, bits: int, codebook: str = "exact") -> PackedTensor:
    """``(packed codes, μ, σ, shape)`` of ``w``: ``ceil(n·bits/8)`` bytes + two fp32 scalars."""
    codes, stats = quantize(w, bits, codebook)
    return PackedTensor(pack_codes(codes, bits), stats[0], stats[1], w.shape)


def dequantize_from_storage(packed: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, shape, bits: int,
                            dtype: torch.dtype = torch.float32, codebook: str = "exact") -> torch.Tensor:
    """The tensor :func:`quantize_for_storage` stored; equals the :func:`fake_quantize` forward exactly."""
    shape = torch.Size(shape)
    codes = unpack_codes(packed, bits, shape.numel()).view(shape)
    mu = torch.as_tensor(mu, dtype=torch.float32, device=packed.device)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=packed.device)
    return dequantize(codes, mu, sigma, bits, codebook).to(dtype)


# ============================================================================ accounting
def adapter_storage_bytes(model, adapter_name: str | None = None) -> dict[str, float]:
    """What ``model.save_pretrained`` stores for one adapter (any method).

    Returns ``{"tensor_bytes", "params", "bits_per_param"}``: ``tensor_bytes`` = Σ
    numel·element_size of the saved tensors (the safetensors file adds a JSON header of
    ~50–100 bytes per tensor), ``params`` = the adapter's parameter count (layers and
    ``modules_to_save`` copies), ``bits_per_param`` = ``8·tensor_bytes / params`` (32 for
    fp32 LoRA; ≈ k plus the per-tensor ``μ, σ`` and shape overhead for a k-bit adapter).
    """
    from .diagnostics import adapter_sizes

    name = adapter_name or model.active_adapter
    model.check_known(name)
    sizes = adapter_sizes(model)[name]
    params, stored = sizes["params"], sizes["stored_bytes"]
    return {"tensor_bytes": stored, "params": params, "bits_per_param": 8 * stored / params if params else 0.0}
