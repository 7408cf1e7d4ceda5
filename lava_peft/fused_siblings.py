"""Shared-input fusion: adapted Linear layers that read the same input run as one autograd node.

Attention reads one hidden state three times (BERT's query/key/value, Llama's q/k/v_proj) and
a gated MLP twice (gate/up_proj).  With low-rank adapters ``ΔW_i = s_i·U_i V_i`` on ``k`` such
siblings (``V_i ∈ R^{r_i×I}`` down, ``U_i ∈ R^{O_i×r_i}`` up, ranks may differ), the node computes

    H_i = x V_iᵀ                               (N×r_i)
    y_i = b_i + H_i (s_i U_i)ᵀ + x W_iᵀ         (base GEMM with β = 1)

and its backward, given ``∂y_i`` (an unused output counts as 0):

    ∂H_i = ∂y_i (s_i U_i)                      ∂H = [∂H_1, …, ∂H_k]  (N×R)
    ∂U_i = s_i (H_iᵀ ∂y_i)ᵀ
    ∂[V_1; …; V_k] = ∂Hᵀ x                     (ONE pass over x, split by rows)
    ∂x = ∂H [V_1; …; V_k] + Σ_i ∂y_i W_i       (ONE thin product, the base GEMMs accumulate, β = 1)

— in the backward the input is read once instead of ``k`` times for the down factors' gradient,
one thin product instead of ``k`` makes the input gradient, and autograd sums no ``k`` separate
``N×I`` input gradients; ``k`` autograd nodes become one.  The forward computes each ``H_i`` with
the very product the per-layer node (:mod:`lava_peft.fused_linear`) uses, so the **outputs are
bit-identical** to the unfused path and never depend on whether a group has been decided yet (a
model's first call and a freshly loaded copy agree bit for bit with a trained one); the
gradients equal the unfused ones up to summation order.  ``SiblingGroup.concat_forward = True``
also computes ``H = x [V_1; …; V_k]ᵀ`` as one GEMM (one pass over ``x`` in the forward too, at
the price of last-bit differences between the first, observed call and later ones).

**Who runs it.**  :func:`candidate_sets` of the layers (done by the injection code) groups the
adapted plain ``nn.Linear`` children of one parent module with equal ``in_features``.  A
:class:`CandidateSet` then *watches* one forward pass (every member runs its own path): the
members that receive the very same input tensor object become a :class:`SiblingGroup`
(e.g. Llama's ``{q,k,v,o}_proj`` candidates give the group ``{q,k,v}``; ``o_proj`` reads the
attention output and stays alone; cross-attention keys/values never join the query).  In a
group, the first member called with an input (the *leader*) runs the node for every member
that can take it right now and keeps the others' outputs; a member called next with the same
input object (unchanged: same version counter; same grad mode) takes its output.  Anything
unexpected — a kept output still unclaimed when a new input arrives — turns the group off for
good (``state = "unshared"``): the layers then run as before (so does one model run from several
threads at once: their calls interleave, and the group turns itself off; results stay exact).

**What falls back** (the member runs its own path, the others may still fuse): a disabled
layer, a mixed-adapter batch, merged adapters, more or fewer than one active adapter, an
adapter without ``linear_factors()`` (SHiRA, DoRA, conv), active adapter dropout, a base layer
that is not a plain frozen ``nn.Linear``, autocast, ``torch.compile`` tracing, saved-tensor hooks
(non-reentrant activation checkpointing, whose recomputation must save what the forward saved;
``save_on_cpu``), and ``enabled = False`` (``AdaptedModel.shared_input_fusion``).  ``tests/test_fused_siblings.py``
checks outputs and every gradient against the unfused path.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .fused_linear import frozen_linear_weight, fusable, lowrank_linear
from .methods.base import DeltaAdapter, _dropout_active

# a member's fused term: (W, b, down (r, I), up (O, r), scale)
Term = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor, torch.Tensor, float]


class _SharedInputLowRank(torch.autograd.Function):
    """``k`` frozen Linears + their low-rank adapters on one input ``x`` (see the module docstring).

    ``tensors`` is ``(W_1, b_1, V_1, U_1, W_2, …)`` (``b_i`` may be ``None``); returns ``(y_1, …, y_k)``.
    """

    @staticmethod
    def forward(ctx, x, scales, concat_forward, *tensors):
        ctx.set_materialize_grads(False)
        k = len(scales)
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        weights, biases = tensors[0::4], tensors[1::4]
        downs = [d.to(dtype) for d in tensors[2::4]]
        ups = tensors[3::4]
        down_cat = torch.cat(downs, dim=0)  # (R, I), tiny
        ranks = [d.shape[0] for d in downs]
        if concat_forward:  # one pass over x; the last bits differ from the per-layer node's x·V_iᵀ
            hiddens = list((x2 @ down_cat.T).split(ranks, dim=1))
        else:  # exactly the per-layer node's products: outputs never depend on the grouping
            hiddens = [x2 @ d.T for d in downs]
        outs, ups_t = [], []
        for i in range(k):
            # (s·U)ᵀ contiguous (r, O): ∂H_i = ∂y_i·(s·U) then reads a column-major operand (faster on CPU BLAS)
            up_t = (ups[i] * scales[i]).T.contiguous().to(dtype)
            out = x.new_empty(*x.shape[:-1], up_t.shape[1])
            out2 = out.view(-1, up_t.shape[1])
            if biases[i] is not None:
                torch.addmm(biases[i], hiddens[i], up_t, out=out2)
            else:
                torch.mm(hiddens[i], up_t, out=out2)
            out2.addmm_(x2, weights[i].T)
            outs.append(out)
            ups_t.append(up_t)
        ctx.save_for_backward(x2, down_cat, *weights, *ups_t, *hiddens)
        ctx.k, ctx.ranks, ctx.scales, ctx.x_shape = k, ranks, scales, x.shape
        ctx.down_dtypes = [d.dtype for d in tensors[2::4]]
        ctx.up_dtypes = [u.dtype for u in ups]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        k, ranks = ctx.k, ctx.ranks
        x2, down_cat, *rest = ctx.saved_tensors
        weights, ups_t, hiddens = rest[:k], rest[k:2 * k], rest[2 * k:]
        g2 = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads]
        grad_tensors: list[torch.Tensor | None] = [None] * (4 * k)
        if all(g is None for g in g2):
            return (None, None, None, *grad_tensors)
        pieces = []
        for i in range(k):
            if g2[i] is None:
                pieces.append(x2.new_zeros(x2.shape[0], ranks[i]))
                continue
            pieces.append(g2[i] @ ups_t[i].T)
            if ctx.needs_input_grad[3 + 4 * i + 3]:
                grad_tensors[4 * i + 3] = (hiddens[i].T @ g2[i]).to(ctx.up_dtypes[i]).T * ctx.scales[i]
        grad_hidden = torch.cat(pieces, dim=1)  # (N, R), thin
        if any(ctx.needs_input_grad[3 + 4 * i + 2] for i in range(k)):
            grad_down_cat = grad_hidden.T @ x2  # the one pass over x
            for i, part in enumerate(grad_down_cat.split(ranks, dim=0)):
                if ctx.needs_input_grad[3 + 4 * i + 2]:
                    grad_tensors[4 * i + 2] = part.to(ctx.down_dtypes[i])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_hidden @ down_cat  # the one thin product for all members
            for i in range(k):
                if g2[i] is not None:
                    grad_x.addmm_(g2[i], weights[i])
            grad_x = grad_x.view(ctx.x_shape)
        return (grad_x, None, None, *grad_tensors)


def shared_input_lowrank(x: torch.Tensor, terms: Sequence[Term], concat_forward: bool = False) -> tuple[torch.Tensor, ...]:
    """``y_i = x W_iᵀ + b_i + s_i (x V_iᵀ) U_iᵀ`` for every term ``(W_i, b_i, V_i, U_i, s_i)``, as one node.

    ``concat_forward=True`` also computes the forward ``H`` as one GEMM (see the module docstring)."""
    flat: list = []
    for weight, bias, down, up, _ in terms:
        flat += [weight, bias, down, up]
    return _SharedInputLowRank.apply(x, tuple(float(t[4]) for t in terms), bool(concat_forward), *flat)


def _version_of(x: torch.Tensor) -> int:
    try:
        return x._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot be changed in place)
        return -1


def _call_key(x: torch.Tensor) -> tuple:
    return (id(x), _version_of(x), torch.is_grad_enabled())


def _compiling() -> bool:
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(check and check())


def _saved_tensor_hooks_active() -> bool:
    """Inside ``saved_tensors_hooks`` (non-reentrant activation checkpointing, ``save_on_cpu``)?

    Checkpointing re-runs the forward in the backward and requires it to save the same tensors;
    a group decided (or turned off) in between would change the path, so such regions always
    run each layer on its own.
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def fusion_term(layer: nn.Module, x: torch.Tensor) -> Term | None:
    """``(W, b, down, up, scale)`` of an adapted layer (``AdaptedLayer``) whose call on ``x`` may join a
    fused node: enabled, not mixed, nothing merged, exactly one active adapter offering the default
    low-rank ``fused_linear`` (SHiRA, DoRA and conv adapters do not), no active adapter dropout,
    a plain frozen ``nn.Linear`` base and an input it can take (:func:`~lava_peft.fused_linear.fusable`).
    Every check runs before ``linear_factors()``, the only call that may draw (DyLoRA, MoSA)."""
    if layer.disabled or layer.mixed_adapter_names is not None or layer.merged_adapters:
        return None
    active = [a for a in layer.active_adapters if a in layer.adapters]
    if len(active) != 1:
        return None
    adapter = layer.adapters[active[0]]
    if (not isinstance(adapter, DeltaAdapter) or adapter.spec.kind != "linear" or _dropout_active(adapter)
            or type(adapter).fused_linear is not DeltaAdapter.fused_linear or "fused_linear" in adapter.__dict__):
        return None
    base = frozen_linear_weight(layer.base_layer)
    if base is None or not fusable(x, base[0]):
        return None
    factors = adapter.linear_factors()
    if factors is None:
        return None
    down, up, scale = factors
    return base[0], base[1], down, up, scale


def assign_group(layer: nn.Module, group: "SiblingGroup | CandidateSet | None") -> None:
    """Point ``layer`` at its group (its ``forward`` asks ``layer.sibling_group`` first)."""
    layer.sibling_group = group


class SiblingGroup:
    """Layers seen reading the same input; the leader runs :func:`shared_input_lowrank` for them all.

    ``members`` are adapted layers; :func:`fusion_term` says whether and how each call can join.  ``fused_calls`` counts fused nodes run,
    ``fused_members`` the member outputs they produced (both for tests and diagnostics).
    """

    def __init__(self, members: Sequence[nn.Module], enabled: bool = True):
        self.members = list(members)
        self.enabled = enabled
        self.concat_forward = False  # True: the forward H as one GEMM too (outputs then differ in the last bits)
        self.state = "shared"
        self.fused_calls = 0
        self.fused_members = 0
        self._pending: tuple | None = None  # (x, key, {member index: output})

    def __getstate__(self):  # copies (deepcopy, pickle) drop outputs held for the pass in progress
        return {**self.__dict__, "_pending": None}

    def forward(self, layer: nn.Module, x) -> torch.Tensor | None:
        """``layer``'s output from a fused node (run now, or kept from the leader's call), or ``None``."""
        if self.state != "shared" or not torch.is_tensor(x) or _saved_tensor_hooks_active():
            return None
        index = next((i for i, m in enumerate(self.members) if m is layer), None)
        if index is None:  # a shallow copy of a member (e.g. nn.DataParallel's replicas) runs on its own
            return None
        pending = self._pending
        if pending is not None:
            held_x, key, outs = pending
            if held_x is x and key == _call_key(x):
                out = outs.pop(index, None)
                if not outs:
                    self._pending = None
                return out  # None: this member was not in the node (it runs its own path)
            self._pending = None  # outputs nobody claimed: the layers do not share inputs as observed
            self.state = "unshared"
            return None
        if not self.enabled or _compiling():
            return None
        mine = fusion_term(layer, x)
        if mine is None:
            return None
        terms = {index: mine}
        for i, member in enumerate(self.members):
            if i != index:
                term = fusion_term(member, x)
                if term is not None:
                    terms[i] = term
        if len(terms) < 2:  # alone: its own fused node, from the factors already read (read once per call)
            return lowrank_linear(x, *mine)
        order = sorted(terms)
        outs = dict(zip(order, shared_input_lowrank(x, [terms[i] for i in order], self.concat_forward)))
        self.fused_calls += 1
        self.fused_members += len(order)
        mine_out = outs.pop(index)
        self._pending = (x, _call_key(x), outs)
        return mine_out


class CandidateSet:
    """Layers that *may* share an input; one observed forward pass decides which do.

    Each member call is recorded (the input object, held until the decision); when every member
    has been seen, or one is seen a second time, members whose inputs were the same object form
    a :class:`SiblingGroup` (groups of one are dropped) and every member is pointed at its group
    or at ``None`` (:func:`assign_group`).
    """

    def __init__(self, members: Sequence[nn.Module], enabled: bool = True):
        self.members = list(members)
        self.enabled = enabled
        self.state = "observing"
        self._seen: dict[int, torch.Tensor] = {}

    def __getstate__(self):  # copies (deepcopy, pickle) start observing afresh
        return {**self.__dict__, "_seen": {}}

    def forward(self, layer: nn.Module, x) -> None:
        """Record the call; always ``None`` (the layer runs its own path while the set observes)."""
        if not torch.is_tensor(x) or _compiling():
            return None
        index = next((i for i, m in enumerate(self.members) if m is layer), None)
        if index is None:
            return None
        if index in self._seen:
            self._decide()
        else:
            self._seen[index] = x
            if len(self._seen) == len(self.members):
                self._decide()
        return None

    def _decide(self) -> None:
        by_input: dict[int, list[int]] = {}
        for i, x in self._seen.items():
            by_input.setdefault(id(x), []).append(i)
        self._seen = {}
        for member in self.members:
            assign_group(member, None)
        for indices in by_input.values():
            if len(indices) > 1:
                group = SiblingGroup([self.members[i] for i in sorted(indices)], enabled=self.enabled)
                for i in indices:
                    assign_group(self.members[i], group)


def candidate_sets(named_layers: Sequence[tuple[str, nn.Module]], in_features: Callable[[nn.Module], int | None],
                   enabled: bool = True) -> list[CandidateSet]:
    """Group ``(name, layer)`` pairs by parent module name and ``in_features`` (``None``: not a candidate);
    every group of two or more becomes a :class:`CandidateSet` its members point at; the other layers
    point at ``None`` (:func:`assign_group`)."""
    buckets: dict[tuple[str, int], list[nn.Module]] = {}
    for name, layer in named_layers:
        assign_group(layer, None)
        width = in_features(layer)
        if width is not None:
            buckets.setdefault((name.rpartition(".")[0], width), []).append(layer)
    sets = []
    for members in buckets.values():
        if len(members) > 1:
            cset = CandidateSet(members, enabled=enabled)
            for member in members:
                assign_group(member, cset)
            sets.append(cset)
    return sets
