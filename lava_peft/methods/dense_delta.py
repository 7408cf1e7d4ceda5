"""Dense delta: a full weight increment ``ΔW`` stored as one tensor.

This is the representation of last resort for results that have no useful
factorisation — mainly the output of :meth:`AdaptedModel.add_weighted_adapter` with
``combination_type`` ``"ties"``, ``"dare_linear"``, ``"dare_ties"`` or
``"magnitude_prune"`` (a sparsified, sign-resolved sum of increments is generally full
rank), and ``"linear"`` combinations of methods that expose no factors::

    ΔW = s · D,      D ∈ R^{O × I × K1 × … × KN}  (canonical layout),  s = alpha / r

With the defaults ``r = alpha = 1`` the scale is exactly 1.  It is a normal adapter:
it merges, unmerges, saves (``<module>.delta``), loads, runs in mixed batches and can
be trained (it is then full fine-tuning of the layer's increment).  It stores
``O·I·ΠK`` numbers per layer — as many as the base weight — so prefer a low-rank
result (``svd_rank=...``) when size matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import AdapterConfig, register_method
from .base import LayerSpec
from .base import DeltaAdapter


@dataclass
class DenseDeltaConfig(AdapterConfig):
    """A full ``ΔW`` per adapted layer (zero at init). ``r``/``alpha`` only set the scale ``alpha/r``."""

    r: int = 1
    alpha: float = 1.0


class DenseDeltaAdapter(DeltaAdapter):
    def __init__(self, spec: LayerSpec, config: DenseDeltaConfig, module_name: str):
        super().__init__(spec, config, module_name)
        self.delta = nn.Parameter(torch.zeros(spec.canonical_shape))

    def delta_weight(self) -> torch.Tensor:
        return self.delta * self.scale  # a new tensor: callers may modify it in place


register_method("dense_delta", DenseDeltaConfig, DenseDeltaAdapter)
