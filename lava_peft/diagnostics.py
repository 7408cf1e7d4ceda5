"""Diagnostics for adapters: sizes, ΔW spectra, overlap between adapters, merged change.

* :func:`adapter_sizes` — per adapter: parameter count, trainable count and the bytes
  ``save_pretrained`` stores (tensor payload, without the safetensors header).
* :func:`delta_spectra` / :func:`plot_spectra` — singular values of every layer's
  ``ΔW ∈ R^{O×I×K1×…×KN}`` under the unfoldings of the LAVA paper's §3 check:

  - ``"O x I*K"``: ``ΔW.reshape(O, I·ΠK)`` (what LoRA-conv factorises);
  - ``"O*K1 x I*K2"``: rows ``(o, k1)``, columns ``(i, k2, …, kN)`` (conv only);
  - ``"mode-n"``: the mode-``n`` unfolding ``ΔW_(n) ∈ R^{d_n × Π_{m≠n} d_m}`` for every
    mode ``n`` (``O``, ``I``, ``K1``, …).  A rank-``r`` CP tensor has every mode rank
    ``≤ r``; a flattened LoRA of rank ``r`` only bounds ``"O x I*K"``.

* :func:`adapter_overlap` — AWOM/AWOR (SHiRA, arXiv 2406.13175) per layer for two
  adapters: with ``A = ΔW_1``, ``B = ΔW_2`` flattened to ``O × F`` (``F = I·ΠK``) and
  ``M = AᵀB ∈ R^{F×F}`` (``orientation="in"``) or ``M = ABᵀ ∈ R^{O×O}`` (``"out"``;
  ``"auto"`` picks the smaller ``m``)::

      AWOM = ‖M‖₂ (spectral norm)        AWOR = 1 − nnz(M) / m²

  Orthogonal adapters have AWOM = 0; adapters touching disjoint rows/columns have a
  sparse ``M`` (AWOR near 1); dense low-rank adapters have AWOR ≈ 0.
* :func:`gradient_variance` — the across-minibatch variance (covariance trace) of the adapter
  gradients at a fixed model state, per tensor, per layer and in total.
* :func:`merged_change_fraction` — SHiRA's %C: the share of base weights that merging an
  adapter changes (``fl(W + ΔW) ≠ W`` in the base dtype, so increments below half an
  ulp of a low-precision weight count as unchanged).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import LavaError
from .inject import adapted_layers, saved_module_wrappers


# =============================================================================== sizes
def adapter_sizes(model) -> dict[str, dict[str, int]]:
    """``{adapter: {"params", "trainable_params", "stored_bytes", "layers"}}``.

    ``params`` counts the adapter's tensors on every layer plus its ``modules_to_save``
    copies; ``trainable_params`` those with ``requires_grad`` right now (0 for an inactive
    or inference-only adapter); ``stored_bytes`` is ``Σ numel·element_size`` of the tensors
    ``save_pretrained`` writes for it.
    """
    out = {}
    for name in model.peft_config:
        params = trainable = 0
        layers = 0
        for _, layer in adapted_layers(model.model):
            if name in layer.adapters:
                layers += 1
                for p in layer.adapters[name].parameters():
                    params += p.numel()
                    trainable += p.numel() if p.requires_grad else 0
        for _, wrapper in saved_module_wrappers(model.model):
            if name in wrapper.copies:
                for p in wrapper.copies[name].parameters():
                    params += p.numel()
                    trainable += p.numel() if p.requires_grad else 0
        stored = sum(t.numel() * t.element_size() for t in model.adapter_state_dict(name).values())
        out[name] = {"params": params, "trainable_params": trainable, "stored_bytes": stored, "layers": layers}
    return out


# =============================================================================== spectra
def unfoldings(delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """The matrices whose spectra :func:`delta_spectra` reports, for ``ΔW`` of shape ``(O, I, *K)``."""
    shape = tuple(delta.shape)
    out = {"O x I*K": delta.reshape(shape[0], -1)}
    if len(shape) >= 3:
        perm = (0, 2, 1, *range(3, len(shape)))
        out["O*K1 x I*K2"] = delta.permute(perm).reshape(shape[0] * shape[2], -1)
    labels = ["O", "I"] + [f"K{k}" for k in range(1, len(shape) - 1)]
    for n, label in enumerate(labels):
        out[f"mode-{n} ({label})"] = delta.movedim(n, 0).reshape(shape[n], -1)
    return out


def delta_spectra(model, adapter_name: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer path: {unfolding: singular values (descending, float64)}}`` of ``ΔW``."""
    name = adapter_name or model.active_adapter
    model.check_known(name)
    out = {}
    with torch.no_grad():
        for path, adapter in model.adapter_layers(name):
            delta = adapter.delta_weight().detach().double().cpu()
            out[path] = {k: torch.linalg.svdvals(m) for k, m in unfoldings(delta).items()}
    return out


def numerical_rank(singular_values: torch.Tensor, rtol: float = 1e-6) -> int:
    """Number of singular values above ``rtol · σ_max``."""
    if singular_values.numel() == 0 or singular_values[0] == 0:
        return 0
    return int((singular_values > rtol * singular_values[0]).sum())


def plot_spectra(spectra: dict[str, dict[str, torch.Tensor]], path: str, title: str | None = None) -> str:
    """Plot ``σ_i / σ_1`` (log scale) per unfolding kind, one line per layer; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = []
    for per_layer in spectra.values():
        for k in per_layer:
            short = k.split(" (")[0] if k.startswith("mode-") else k
            if short not in kinds:
                kinds.append(short)
    if not kinds:
        raise LavaError("no spectra to plot")
    cols = min(3, len(kinds))
    rows = math.ceil(len(kinds) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, kind in zip(axes.flat, kinds):
        for layer, per_layer in spectra.items():
            for k, s in per_layer.items():
                short = k.split(" (")[0] if k.startswith("mode-") else k
                if short == kind and s.numel() and s[0] > 0:
                    ax.semilogy(range(1, s.numel() + 1), (s / s[0]).clamp_min(1e-16).numpy(), label=layer, lw=1)
        ax.set_title(kind)
        ax.set_xlabel("index i")
        ax.set_ylabel("σ_i / σ_1")
    for ax in list(axes.flat)[len(kinds):]:
        ax.axis("off")
    if len(spectra) <= 8:
        axes.flat[0].legend(fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


# =============================================================================== overlap
def overlap_matrices(delta1: torch.Tensor, delta2: torch.Tensor, orientation: str = "auto") -> torch.Tensor:
    """``M = AᵀB`` (``"in"``) or ``ABᵀ`` (``"out"``) for ``A, B`` the ``O × F`` flattenings."""
    a = delta1.reshape(delta1.shape[0], -1).double()
    b = delta2.reshape(delta2.shape[0], -1).double()
    if orientation == "auto":
        orientation = "in" if a.shape[1] <= a.shape[0] else "out"
    if orientation == "in":
        return a.T @ b
    if orientation == "out":
        return a @ b.T
    raise LavaError(f"orientation must be 'auto', 'in' or 'out'; got {orientation!r}")


def awom_awor(delta1: torch.Tensor, delta2: torch.Tensor, orientation: str = "auto", tol: float = 0.0) -> tuple[float, float]:
    """``(AWOM, AWOR)`` of two increments of one layer (entries with ``|M| ≤ tol`` count as zero)."""
    m = overlap_matrices(delta1, delta2, orientation)
    awom = torch.linalg.matrix_norm(m, ord=2).item() if m.numel() else 0.0
    nnz = int((m.abs() > tol).sum())
    return awom, 1.0 - nnz / m.numel()


def adapter_overlap(model, adapter1: str, adapter2: str, orientation: str = "auto", tol: float = 0.0) -> dict:
    """AWOM/AWOR per layer both adapters adapt, and their means over those layers."""
    model.check_known([adapter1, adapter2])
    per_layer = {}
    with torch.no_grad():
        for path, layer in adapted_layers(model.model):
            if adapter1 in layer.adapters and adapter2 in layer.adapters:
                d1 = layer.adapters[adapter1].delta_weight().detach().cpu()
                d2 = layer.adapters[adapter2].delta_weight().detach().cpu()
                awom, awor = awom_awor(d1, d2, orientation, tol)
                per_layer[path] = {"awom": awom, "awor": awor}
    if not per_layer:
        raise LavaError(f"adapters {adapter1!r} and {adapter2!r} share no layer; AWOM/AWOR are undefined")
    return {
        "per_layer": per_layer,
        "awom_mean": sum(v["awom"] for v in per_layer.values()) / len(per_layer),
        "awor_mean": sum(v["awor"] for v in per_layer.values()) / len(per_layer),
    }


# =============================================================================== merged change
def merged_change_fraction(model, adapter_name: str | None = None) -> dict:
    """How many base weights merging ``adapter_name`` would change: ``fl(W + ΔW) ≠ W`` elementwise.

    Returns ``changed``, ``adapted_weights`` (entries of the adapted layers' weights),
    ``model_params`` (all base-model parameters, adapters excluded) and the two percentages.
    Computed from the current weights without modifying them; the adapter must not be merged.
    """
    name = adapter_name or model.active_adapter
    model.check_known(name)
    if name in model.merged_adapters:
        raise LavaError(f"adapter {name!r} is merged; unmerge it to measure what merging changes")
    changed = adapted = 0
    with torch.no_grad():
        for _, layer in adapted_layers(model.model):
            if name not in layer.adapters:
                continue
            w = layer.base_weight.detach()
            delta = layer.delta_in_base_layout(name).detach()
            changed += int(((w + delta) != w).sum())
            adapted += w.numel()
    adapter_ids = set()
    for _, layer in adapted_layers(model.model):
        adapter_ids.update(id(p) for p in layer.adapters.parameters())
    for _, wrapper in saved_module_wrappers(model.model):
        adapter_ids.update(id(p) for p in wrapper.copies.parameters())
    total = sum(p.numel() for p in model.model.parameters() if id(p) not in adapter_ids)
    return {
        "changed": changed,
        "adapted_weights": adapted,
        "model_params": total,
        "percent_of_adapted": 100.0 * changed / adapted if adapted else 0.0,
        "percent_of_model": 100.0 * changed / total if total else 0.0,
    }


__all__ = [
    "adapter_overlap",
    "adapter_sizes",
    "awom_awor",
    "delta_spectra",
    "merged_change_fraction",
    "numerical_rank",
    "overlap_matrices",
    "plot_spectra",
    "unfoldings",
]


# =============================================================================== gradient variance
def gradient_variance(model, batches, loss_fn, adapter_name: str | None = None) -> dict:
    """Across-minibatch variance of the adapter gradients at the model's *current* state.

    For minibatches ``b = 1..B`` (``batches``, ``B ≥ 2``) the gradient ``g_b = ∇_θ loss_fn(model,
    batch_b)`` of every tensor ``θ`` of the adapter's layers is taken at the same parameters; per
    tensor (and summed per layer and over the model)::

        var   = 1/(B−1) · Σ_b ‖g_b − ḡ‖²     (trace of the unbiased covariance of the gradient)
        mean² = ‖ḡ‖²,   ḡ = 1/B · Σ_b g_b

    ``loss_fn(model, batch)`` returns the scalar loss of one minibatch (e.g. the data loss only: a
    regularizer that does not depend on the batch adds the same vector to every ``g_b`` and leaves
    ``var`` unchanged).  Parameters and their ``.grad`` are left as they were; the model's
    train/eval mode is the caller's choice (dropout adds its own noise).

    Returns ``{"batches": B, "total": {"var", "mean_sq"}, "layers": {path: {"var", "mean_sq",
    "tensors": {name: {"var", "mean_sq"}}}}}``.
    """
    name = adapter_name or model.active_adapter
    model.check_known(name)
    tensors: dict[tuple[str, str], torch.nn.Parameter] = {}
    for path, layer in adapted_layers(model.model):
        if name in layer.adapters:
            for pname, p in layer.adapters[name].named_parameters():
                if p.requires_grad:
                    tensors[(path, pname)] = p
    if not tensors:
        raise LavaError(f"adapter {name!r} has no trainable tensors to probe; set_adapter({name!r}) first")
    params = list(tensors.values())
    saved = [p.grad for p in params]
    grads: list[list[torch.Tensor]] = []
    try:
        for batch in batches:
            for p in params:
                p.grad = None
            loss = loss_fn(model, batch)
            gs = torch.autograd.grad(loss, params, allow_unused=True)
            grads.append([torch.zeros_like(p, dtype=torch.float64) if g is None else g.detach().double()
                          for p, g in zip(params, gs)])
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    if len(grads) < 2:
        raise LavaError(f"gradient_variance needs at least 2 minibatches; got {len(grads)}")
    n = len(grads)
    layers: dict[str, dict] = {}
    for k, (path, pname) in enumerate(tensors):
        stack = torch.stack([g[k] for g in grads])
        mean = stack.mean(0)
        var = ((stack - mean) ** 2).sum().item() / (n - 1)
        entry = layers.setdefault(path, {"var": 0.0, "mean_sq": 0.0, "tensors": {}})
        entry["tensors"][pname] = {"var": var, "mean_sq": mean.pow(2).sum().item()}
        entry["var"] += var
        entry["mean_sq"] += entry["tensors"][pname]["mean_sq"]
    total = {"var": sum(e["var"] for e in layers.values()), "mean_sq": sum(e["mean_sq"] for e in layers.values())}
    return {"batches": n, "total": total, "layers": layers}
