"""Sparse increments: a value vector at fixed flat indices of the canonical ``(O, I, *K)`` weight.

:class:`SparseDeltaAdapter` is what SHiRA and LT-SFT share: ``ΔW.reshape(-1)[idx] = scale·v``
with trainable fp32 values ``v`` and a sorted unique index buffer ``idx`` (int32 where it
fits).  It offers :meth:`~SparseDeltaAdapter.sparse_delta` (scatter merges, exact sparse
combination), the fused sparse node on plain Linear layers (:mod:`lava_peft.fused_sparse`)
and refuses an index buffer from a file that is not a valid support.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import AdapterFileError, LavaError
from ..fused_linear import frozen_linear_weight
from ..fused_sparse import csr_pattern, sparse_delta_linear, sparse_fusable
from .base import DeltaAdapter, LayerSpec, _dropout_active

_INT32_LIMIT = 2**31 - 1


def index_dtype(numel: int) -> torch.dtype:
    """int32 flat indices where they fit (half the bytes of int64), else int64."""
    return torch.int32 if numel <= _INT32_LIMIT else torch.int64


def index_problem(indices: torch.Tensor, numel: int) -> str | None:
    """Why ``indices`` is not a valid sparse support of a ``numel``-entry weight (or ``None``).

    Valid: a 1-D integer tensor, strictly increasing (sorted and unique), in ``[0, numel)``.
    """
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        return f"has dtype {indices.dtype}, not an integer type"
    if indices.dim() != 1:
        return f"has shape {tuple(indices.shape)}, not 1-D"
    if indices.numel() == 0:
        return None
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= numel:
        return f"has entries in [{lo}, {hi}], outside [0, {numel})"
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        return "is not strictly increasing (indices must be sorted and unique)"
    return None


# =============================================================================== the sparse delta
class SparseDeltaAdapter(DeltaAdapter):
    """A sparse ``ΔW``: values ``v`` (fp32, trainable) at fixed flat indices ``idx`` of ``(O, I, *K)``.

    ``ΔW.reshape(-1)[idx] = scale·v``.  Subclasses (SHiRA; sparse fine-tuning masks in
    general) only decide the indices.  ``indices=None`` builds a placeholder of ``budget``
    entries that must be loaded from a file before use (``load_adapter``).
    """

    def __init__(self, spec: LayerSpec, config, module_name: str, indices: torch.Tensor | None, budget: int):
        super().__init__(spec, config, module_name)
        self.module_name = module_name
        self._numel = math.prod(spec.canonical_shape)
        self._awaiting_file = indices is None
        if indices is None:
            indices = torch.arange(budget)
        self.sparse_values = nn.Parameter(torch.zeros(indices.numel()))
        self.register_buffer("sparse_indices", indices.to(index_dtype(self._numel)).contiguous())

    # -- protocol ---------------------------------------------------------------
    def _ready(self) -> None:
        if self._awaiting_file:
            raise LavaError(
                f"the sparse adapter on {self.module_name} was built from a saved config (masks='saved') but its "
                "indices were never loaded; load it with model.load_adapter(dir), or give the config masks=None / "
                "masks=with_masks(...) to build new ones"
            )

    def sparse_delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx, scale·v)``: ``ΔW.reshape(-1)[idx] = scale·v`` in the canonical layout (merge / combine hook)."""
        self._ready()
        return self.sparse_indices, self.sparse_values * self.scale

    def delta_weight(self) -> torch.Tensor:
        """Dense ``ΔW``: ``zeros(numel).index_add(0, idx, v, alpha=scale)`` (its gradient w.r.t. ``v`` is
        ``∂L/∂ΔW`` gathered at ``idx``, times ``scale``)."""
        self._ready()
        flat = self.sparse_values.new_zeros(self._numel)
        flat = flat.index_add(0, self.sparse_indices, self.sparse_values, alpha=self.scale)
        return flat.view(self.spec.canonical_shape)

    def uses_weight_path(self) -> bool:
        """One op with ``W0 + ΔW`` on every layer type; a separate op only while input dropout is active."""
        return self.spec.kind == "embedding" or not _dropout_active(self)

    def uses_weight_path_for(self, x, layer) -> bool:
        """A plain frozen fp32 Linear on the CPU runs the fused sparse node instead (:meth:`fused_linear`)."""
        return self.uses_weight_path() and not self._sparse_node_applies(x, layer.base_layer)

    def _sparse_node_applies(self, x, base_layer) -> bool:
        base = frozen_linear_weight(base_layer)
        return (self.spec.kind == "linear" and not _dropout_active(self) and base is not None
                and sparse_fusable(x, base[0]))

    def fused_linear(self, x, weight, bias):
        """``x (W + s·S)ᵀ + b`` with the sparse weight gradient (:mod:`lava_peft.fused_sparse`), or ``None``."""
        if self.spec.kind != "linear" or _dropout_active(self) or not sparse_fusable(x, weight):
            return None
        self._ready()
        crow, cols = self._csr_pattern()
        return sparse_delta_linear(x, weight, bias, self.sparse_values, self.sparse_indices, crow, cols, self.scale)

    def _csr_pattern(self) -> tuple[torch.Tensor, torch.Tensor]:
        """CSR rows/columns of the mask in ``O×I``, cached until the index buffer changes (load, hot-swap)."""
        idx = self.sparse_indices
        key = (idx.data_ptr(), idx._version, idx.device)
        if getattr(self, "_csr_key", None) != key:
            self._csr = csr_pattern(idx, self.spec.out_dim, self._numel // self.spec.out_dim)
            self._csr_key = key
        return self._csr

    # -- files ------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Refuse an index buffer that is not a valid support (dtype, order, range, size) before copying it."""
        key = prefix + "sparse_indices"
        incoming = state_dict.get(key)
        if incoming is not None:
            problem = index_problem(incoming, self._numel)
            if problem is None and incoming.shape != self.sparse_indices.shape:
                problem = f"has {incoming.numel()} entries where the config gives {self.sparse_indices.numel()}"
            if problem is not None:
                raise AdapterFileError(
                    f"{self.module_name}.sparse_indices {problem}; it is not a valid mask of the weight "
                    f"{self.spec.canonical_shape}. The adapter file is corrupt or was edited"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if incoming is not None:
            self._awaiting_file = False

    def extra_repr(self) -> str:
        return f"entries={self.sparse_values.numel()}, of={self._numel}, scale={self.scale}"


__all__ = ["SparseDeltaAdapter", "index_dtype", "index_problem"]
