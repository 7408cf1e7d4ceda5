"""DoRA (Liu et al., 2024): weight-decomposed low-rank adaptation, for LoRA and LAVA (incl. conv CP).

With the frozen weight ``W0`` and a low-rank increment ``ΔW = s·B A`` (LAVA: ``s·U V``; on a
conv LAVA the CP sum, flattened ``A_j = V_j ⊗ P_{1j} ⊗ …``), both in the canonical layout
``(O, I, K…)``, DoRA's layer weight is

    W' = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖_c ,

``‖·‖_c`` the norm of each output channel over all other dims (PEFT: ``dim=1`` of a Linear
weight, every dim but the first of a conv kernel, the embedding dim of an ``nn.Embedding``;
the same "row of the canonical layout" everywhere here) and ``m ∈ R^O`` a trained
magnitude, initialised to ``‖W0 + ΔW‖_c`` (so ``W' = W0`` at init).  As in PEFT (and the
paper, §4.3) the norm is *detached*: it is a constant in the backward pass.

Unmerged forward (PEFT's formula), ``g = m / ‖W0 + ΔW‖_c`` per output channel::

    y = base(x) + (g − 1) ⊙ (W0 x̃) + g ⊙ (ΔW x̃)        (x̃ = dropout(x); W0 x̃ without bias)

When dropout is inactive ``W0 x̃`` is the base output minus its bias (no extra op).

Memory-lean norm: no ``W0 + ΔW`` (nor ``ΔW``) is formed.  Per row ``o``::

    ‖W0_o + ΔW_o‖² = ‖W0_o‖² + 2 Σ_j (sB)_{oj} (W0 Aᵀ)_{oj} + ((sB)(A Aᵀ) ⊙ (sB))_o·1

— one GEMM ``W0 Aᵀ`` (``O×r``), the ``r×r`` Gram ``A Aᵀ`` and a row-norm reduction of ``W0``;
extra memory ``O(O·r)`` instead of two ``O×I·ΠK`` temporaries.

Merging sets ``W ← g ⊙ (W + ΔW)`` (the norm taken from the weight being merged into and kept
for unmerge, ``W ← W/g − ΔW``).  ``delta_weight()`` stays the direction's increment ``ΔW``;
:meth:`WeightDecomposed.effective_delta` gives ``W' − W0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LavaConfigError
from .base import _dropout_active
from .factors import adapter_factors


def dora_column_norm(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``‖W0_o + (up·down)_o‖`` for every row ``o`` of ``W0`` (canonical, any trailing dims), fp32, no grad.

    ``up`` (O, r) carries the scale, ``down`` (r, I·ΠK).  Never forms ``up·down`` or ``W0 + ΔW``.
    """
    with torch.no_grad():
        w = weight.detach().reshape(weight.shape[0], -1)
        up = up.detach().float()
        down = down.detach().float()
        base_sq = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).pow(2)
        cross = (w @ down.T.to(w.dtype)).float()  # (O, r)
        gram = down @ down.T  # (r, r)
        sq = base_sq + 2 * (cross * up).sum(1) + ((up @ gram) * up).sum(1)
        return sq.clamp_min(1e-24).sqrt()  # a zero row of W0 + ΔW: g = m / 1e-12 instead of PEFT's 0/0


class WeightDecomposed:
    """Mixin that turns a LoRA/LAVA adapter into its DoRA form (``use_dora=True`` on the config).

    The host class provides the factors through its registered factor codec; a host with a
    faster conv increment (LAVA's separable chain) overrides :meth:`conv_increment`.
    """

    merges_additively = False

    def init_dora(self) -> None:
        self.dora_magnitude = nn.Parameter(torch.ones(self.spec.out_dim))
        self._merged_norm: torch.Tensor | None = None

    # -- the norm ------------------------------------------------------------------------
    def _flat_factors(self):
        f = adapter_factors(self).flattened()  # up with the scale folded in
        return f.up, f.modes[0]

    def column_norm(self, canonical_weight: torch.Tensor) -> torch.Tensor:
        up, down = self._flat_factors()
        return dora_column_norm(canonical_weight, up, down).to(self.dora_magnitude.device)

    def init_from_base(self, canonical_weight: torch.Tensor) -> None:
        """``m ← ‖W0 + ΔW‖_c`` (PEFT's initialisation; ``W' = W0`` when ``ΔW = 0``)."""
        if not canonical_weight.is_floating_point():
            raise LavaConfigError(
                f"DoRA needs a floating-point base weight to normalise; this layer's weight is {canonical_weight.dtype} "
                "(a quantized base); use use_dora=False there (exclude_modules) or a float base"
            )
        with torch.no_grad():
            self.dora_magnitude.copy_(self.column_norm(canonical_weight))

    def _channel_view(self, g: torch.Tensor) -> torch.Tensor:
        """``g`` shaped to broadcast over an output: last dim (Linear/Embedding) or dim 1 (conv)."""
        if self.spec.kind == "conv":
            return g.view(1, -1, *([1] * len(self.spec.kernel_size)))
        return g

    def effective_delta(self, canonical_weight: torch.Tensor) -> torch.Tensor:
        """``W' − W0 = g ⊙ (W0 + ΔW) − W0`` (canonical layout; forms full-size tensors — for tests and tools)."""
        g = self.dora_magnitude / self.column_norm(canonical_weight)
        w = canonical_weight.float()
        return g.view(-1, *([1] * (w.dim() - 1))) * (w + self.delta_weight()) - w

    # -- forward -------------------------------------------------------------------------
    def uses_weight_path(self) -> bool:
        return False

    def uses_weight_path_for(self, x, layer) -> bool:
        return False

    def linear_factors(self):
        return None  # never fused with the base GEMM: the base output itself is rescaled

    def conv_increment(self, x, layer, dtype):
        """``conv(x; ΔW)`` without bias (generic: one conv with the materialised ``ΔW``)."""
        delta = layer.ops.to_base_layout(self.delta_weight()).to(dtype)
        return layer.ops.forward_with_weight(layer.base_layer, x, delta, with_bias=False)

    def _increment(self, x, layer, dtype):
        if self.spec.kind == "conv":
            return self.conv_increment(x, layer, dtype)
        up, down = self._flat_factors()
        if self.spec.kind == "embedding":
            hidden = F.embedding(x, down.T.to(dtype), padding_idx=self.spec.padding_idx)
        else:
            hidden = F.linear(x, down.to(dtype))
        return F.linear(hidden, up.to(dtype))

    def forward(self, x, base_out, layer):
        weight = layer.ops.to_base_layout(layer.base_weight)  # canonical view (a transpose or the weight)
        g = self._channel_view(self.dora_magnitude / self.column_norm(weight)).to(base_out.dtype)
        dtype = base_out.dtype
        if _dropout_active(self) and self.spec.kind != "embedding":
            x = self.dropout(x)
            base_term = layer.ops.forward_with_weight(layer.base_layer, x, layer.base_weight.to(dtype), with_bias=False)
        else:
            bias = getattr(layer.base_layer, "bias", None)
            base_term = base_out if bias is None else base_out - self._channel_view(bias.to(dtype))
        return base_out + (g - 1) * base_term + g * self._increment(x, layer, dtype)

    # -- merge -----------------------------------------------------------------------------
    @torch.no_grad()
    def merge_into_(self, canonical_weight: torch.Tensor, alpha: float) -> None:
        """``alpha=+1``: ``W ← g ⊙ (W + ΔW)``; ``alpha=−1``: ``W ← W / g − ΔW`` (the norm of the merge)."""
        shape = (-1, *([1] * (canonical_weight.dim() - 1)))
        delta = self.delta_weight().to(canonical_weight.dtype)
        if alpha > 0:
            self._merged_norm = self.column_norm(canonical_weight)
            g = (self.dora_magnitude / self._merged_norm).view(shape).to(canonical_weight.dtype)
            canonical_weight.add_(delta).mul_(g)
        else:
            norm = self._merged_norm if self._merged_norm is not None else self.dora_magnitude
            g = (self.dora_magnitude / norm).view(shape).to(canonical_weight.dtype)
            canonical_weight.div_(g).sub_(delta)
            self._merged_norm = None
