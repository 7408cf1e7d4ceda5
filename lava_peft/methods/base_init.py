"""Initialisations that move the principal part of the base weight into the adapter (HF PEFT's PiSSA, OLoRA).

Both start from a linear layer's frozen weight ``W`` (canonical layout ``(O, I)``, computed in fp32) and a
scale ``s`` (``α/r``, or ``α/√r`` with rsLoRA), pick factors ``B₀ ∈ R^{O×r}``, ``A₀ ∈ R^{r×I}`` and replace the
base weight by the residual ``W_res = W − s·B₀A₀``, so the model's output is unchanged at step 0 but
training starts in the weight's dominant subspace:

* **PiSSA** (Meng et al., 2024; ``init="pissa"``): ``W = U Σ Vᵀ`` (thin SVD), ``A₀ = diag(√(σ/s)) V_rᵀ``,
  ``B₀ = U_r diag(√(σ/s))`` with the ``r`` largest singular values ``σ``, so ``s·B₀A₀ = U_r Σ_r V_rᵀ``.
  ``"pissa_niter_<K>"`` takes ``U_r, σ, V_r`` from ``torch.svd_lowrank(W, q=r, niter=K)`` (a randomized
  sketch drawing from torch's global generator; faster on large matrices, approximate).
* **OLoRA** (Büyükakyüz, 2024; ``init="olora"``): ``W = Q R`` (reduced QR), ``B₀ = Q[:, :r]``, ``A₀ = R[:r]``;
  the residual is ``W − s·Q_r R_r`` (PEFT's definition: the scale is not divided out, so for ``s ≠ 1``
  the residual also holds ``(1 − s)·Q_r R_r``).

These are PEFT 0.21's formulas, operation for operation, so factors and residuals agree with it to
the last bit on the same machine (PiSSA's sign convention is ``torch.linalg.svd``'s, as in PEFT).
Only Linear-type layers (``nn.Linear``, GPT-2 ``Conv1D``) have them, as in PEFT.
"""

from __future__ import annotations

import re

import torch

from ..errors import LavaConfigError

PISSA, OLORA = "pissa", "olora"
_NITER = re.compile(r"pissa_niter_(\d+)")

def base_init_kind(init) -> str | None:
    """``"pissa"`` (also ``pissa_niter_<K>``), ``"olora"``, or ``None`` for an init that leaves the base alone."""
    if not isinstance(init, str):
        return None
    if init == PISSA or _NITER.fullmatch(init):
        return PISSA
    return OLORA if init == OLORA else None


def reproducible_on_load(init: str) -> bool:
    """Whether loading can re-derive the same factors and residual from the original base (the exact SVD and
    QR are deterministic; the randomized ``pissa_niter_<K>`` sketch is not)."""
    return init in (PISSA, OLORA)


def check_base_init(owner: str, init: str, use_dora: bool) -> None:
    """Refuse (``LavaConfigError``) a malformed ``pissa_niter_<K>`` or a combination PEFT computes differently."""
    if init.startswith("pissa") and base_init_kind(init) is None:
        raise LavaConfigError(f"{owner}.init={init!r}: write 'pissa' or 'pissa_niter_<K>' with K a whole number "
                              "(e.g. 'pissa_niter_4': a randomized SVD with 4 subspace iterations)")
    if base_init_kind(init) and use_dora:
        raise LavaConfigError(f"{owner}: init={init!r} with use_dora=True is not supported (DoRA's magnitude "
                              "would have to be taken from the residual weight); use one of the two")


def base_init_factors(weight: torch.Tensor, init: str, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B₀, A₀)`` of PiSSA / OLoRA (module docstring) for a canonical ``(O, I)`` weight, in fp32.

    Raises :class:`LavaConfigError` for a weight that is not fp32/fp16/bf16 (a quantized base: PEFT
    refuses it too; initialise on the float weights, then quantize the residual)."""
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise LavaConfigError(f"init={init!r} needs a float32/float16/bfloat16 base weight; this one is "
                              f"{weight.dtype}. Initialise on the float model, then quantize the residual")
    w = weight.detach().to(torch.float32)
    if base_init_kind(init) == OLORA:
        q, rr = torch.linalg.qr(w)
        return q[:, :r].contiguous(), rr[:r].contiguous()
    if init == PISSA:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u_r, s_r, vh_r = u[:, :r], s[:r] / scale, vh[:r]
    else:
        u_r, s_r, v_r = torch.svd_lowrank(w, r, niter=int(_NITER.fullmatch(init).group(1)))
        s_r, vh_r = s_r / scale, v_r.t()
    root = torch.sqrt(s_r)
    return u_r @ torch.diag(root), torch.diag(root) @ vh_r


def residual_weight(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    """``W − s·B₀A₀`` computed in fp32 and returned in ``weight``'s dtype (PEFT's order of operations)."""
    return (weight.detach().to(torch.float32) - scale * up @ down).to(weight.dtype)


class InitialisedFromBase:
    """Mixin of the LoRA-form adapters (LoRA; LAVA on Linear layers): PiSSA / OLoRA from the base weight.

    The adapter sets ``self.base_init`` (the ``init`` string, or ``None``) and offers ``matrix_factors()``
    -> ``(up, down)`` parameters.  :meth:`init_from_base` (called by the model's ``plan``, base read only)
    writes ``B₀, A₀`` into them and keeps a copy as non-persistent buffers (``initial_up`` /
    ``initial_down``: the model's ``commit`` subtracts ``s·B₀A₀`` from the base weight once, through
    :meth:`take_base_change`; conversion to a plain LoRA reads them, ``ΔW = s(BA − B₀A₀)``).
    """

    base_init: str | None = None

    @classmethod
    def check_base_init_layer(cls, spec, config, module_name: str) -> None:
        """Refuse a layer PiSSA / OLoRA do not apply to (before anything changes)."""
        init = getattr(config, "init", None)
        if base_init_kind(init) and spec.kind != "linear":
            raise LavaConfigError(
                f"init={init!r} works on Linear layers (nn.Linear, GPT-2 Conv1D) only, as in PEFT; {module_name} is a "
                f"{spec.kind} layer. Leave it out (exclude_modules=[{module_name!r}]) or use the default init")

    def draw_like_peft_up(self) -> None:
        """Draw (and drop) the Kaiming-uniform values PEFT's ``lora_B`` ``nn.Linear`` consumes before PiSSA
        replaces it, so that ``pissa_niter_<K>``'s random sketch starts from the same generator state as PEFT's."""
        torch.nn.init.kaiming_uniform_(torch.empty(self.spec.out_dim, self.r), a=5 ** 0.5)

    def init_from_base(self, canonical_weight: torch.Tensor) -> None:
        super().init_from_base(canonical_weight)
        if not self.base_init:
            return
        up, down = base_init_factors(canonical_weight, self.base_init, self.r, self.scale)
        up_param, down_param = self.matrix_factors()
        with torch.no_grad():
            up_param.copy_(up)
            down_param.copy_(down)
        self.register_buffer("initial_up", up, persistent=False)
        self.register_buffer("initial_down", down, persistent=False)
        self._base_change_pending = True

    def _apply(self, fn, recurse=True):
        """``model.half()`` / ``.to(bf16)`` moves ``B₀, A₀`` but keeps their fp32 values (conversion needs them)."""
        kept = {n: self._buffers[n] for n in ("initial_up", "initial_down") if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, value in kept.items():
            self._buffers[name] = value.to(self._buffers[name].device)
        return self

    def take_base_change(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(B₀, A₀, s)`` to subtract from the base weight, once (then ``None``)."""
        if not getattr(self, "_base_change_pending", False):
            return None
        self._base_change_pending = False
        return self.initial_up, self.initial_down, self.scale

    def initial_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(B₀, A₀)`` (fp32) of a PiSSA / OLoRA adapter built on a base, else ``None``."""
        up = getattr(self, "initial_up", None)
        return None if up is None else (up.float(), self.initial_down.float())


__all__ = ["InitialisedFromBase", "OLORA", "PISSA", "base_init_factors", "base_init_kind", "check_base_init",
           "reproducible_on_load", "residual_weight"]
