"""Ablation rows for the linear fast path: the library's LAVA with one fast-path change undone at a time.

Each stage replaces the ``forward`` of every LAVA Linear adapter *on that model instance
only* (the library is untouched) and, for the per-layer orthogonality term, the
regularizer used in the training step:

* ``lava[reference]`` — the straightforward path: ``base + (x Vᵀ) Uᵀ · s`` (scale applied to
  the ``N×O`` output, out-of-place add), orth term as a Python loop of per-layer
  ``‖UᵀU − I‖²`` (the pre-issue-6 implementation);
* ``lava[+fold+addmm]`` — scale folded into ``U``, accumulation by out-of-place ``addmm``;
* ``lava[+inplace-view]`` — the ``addmm_`` into the base output in place, through a 2-D
  view of the 3-D output (tried and *rejected*: autograd's CopySlices then clones the
  output gradient in the backward);
* ``lava[+contig-up]`` — out-of-place ``addmm`` with ``(s·U)ᵀ`` as a contiguous ``(r, O)``
  operand (= the library's composed linear path for N-d activations), per-layer orth loop;
* ``lava[composed]`` — the library's composed path (``lowrank_forward``: base op, then the
  adapter's autograd ops) with the batched orth term, i.e. everything but the fused node;
* ``lava`` (the normal row) — frozen Linear + adapter as one autograd node
  (``fused_linear.py``), orth term batched over layers of equal shape.

Every stage switches the fused node off for the patched adapters (``linear_factors`` →
``None``), so the layer calls their ``forward``.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

STAGES = ("reference", "+fold+addmm", "+inplace-view", "+contig-up", "composed")


def _forward_for(stage: str):
    def forward(self, x, base_out, layer):
        if self.spec.kind != "linear":
            return type(self).forward(self, x, base_out, layer)
        dtype = base_out.dtype
        hidden = F.linear(x, self.lava_V.to(dtype))
        if stage == "reference":
            return base_out + F.linear(hidden, self.lava_U.to(dtype)) * self.scale
        up_s = (self.lava_U * self.scale).to(dtype)
        h2 = hidden.reshape(-1, hidden.shape[-1])
        o = up_s.shape[0]
        if stage == "+fold+addmm":
            return torch.addmm(base_out.reshape(-1, o), h2, up_s.T).view(base_out.shape)
        if stage == "+inplace-view":
            base_out.view(-1, o).addmm_(h2, up_s.T)
            return base_out
        return torch.addmm(base_out.reshape(-1, o), h2, up_s.T.contiguous()).view(base_out.shape)  # "+contig-up"

    return forward


def apply_stage(model, stage: str) -> None:
    """Patch every LAVA adapter of ``model`` (an AdaptedModel) to ``stage``'s linear forward (no fused node)."""
    if stage not in STAGES:
        raise ValueError(f"unknown ablation stage {stage!r}; one of {STAGES}")
    for _, adapter in model.adapter_layers():
        adapter.linear_factors = lambda: None  # the layer then runs base op + adapter.forward
        if stage != "composed":
            adapter.forward = types.MethodType(_forward_for(stage), adapter)


def uses_per_layer_orth(stage: str) -> bool:
    """The stages before the batched orth term loop over layers."""
    return stage != "composed"


def per_layer_regularization(model) -> torch.Tensor:
    """The pre-batching orth term: ``λ · mean over layers of Σ_f ‖F_fᵀF_f − I‖²`` in a Python loop."""
    name = model.active_adapter
    lam = model.peft_config[name].regularization_weight()
    terms = [a.regularization() for _, a in model.adapter_layers(name)]
    return lam * torch.stack(terms).mean()
