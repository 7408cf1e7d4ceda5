"""DyLoRA (Valipour et al., EACL 2023): train once for every rank ``b ∈ [r_min, r]``, truncate later.

The adapter holds the factors of a rank-``r`` LoRA (``factorization="lora"``) or LAVA
(``factorization="lava"``) adapter.  Each training step draws ``b ~ U{r_min, …, r}``
and uses only the first ``b`` components, with a rank-dependent scale::

    h = W0 x + (α/b) · U[:, :b] V[:b] x                       (Linear / Embedding / flattened conv)
    ΔW_b[o, i, k1..kN] = (α/b) Σ_{j<b} U[o,j] V[j,i] P1[j,k1] ··· PN[j,kN]   (LAVA conv, CP)

(``α/√b`` with ``use_rslora``.)  So component ``j`` is trained to be useful on top of
components ``< j`` only: the information is ordered, and after training any prefix
``b`` is a usable rank-``b`` adapter.  Update modes (``update``):

* ``"full"``   — every one of the first ``b`` components gets the gradient of the
  truncated formula (the factors are slices ``U[:, :b]``, ``V[:b]``, views of the
  parameters);
* ``"frozen"`` — only component ``b`` learns: the factors are
  ``[U[:, :b-1].detach() | U[:, b-1]]`` (and likewise for ``V``, ``P_k``), so
  components ``1..b-1`` get exactly zero gradient from the loss *and* from LAVA's
  orthogonality term, which acts on the active components ``U[:, :b]``.

Outside training (``model.eval()``) the rank is fixed: ``r`` by default, any ``b`` by
:func:`~lava_peft.tools.dylora.set_rank` (recorded as ``eval_rank`` in the config, so it is saved).  Merging,
:meth:`DyLoraAdapter.delta_weight` and export use that rank; :func:`~lava_peft.tools.dylora.truncate_to_rank`
turns the adapter at rank ``b`` into a plain ``"lora"`` / ``"lava"`` adapter with the same
output (factors ``U[:, :b]``, ``V[:b]``, ``P_k[:b]``, ``r = b``, same ``alpha``: its scale
``α/b`` is the DyLoRA scale at ``b``), which saves, merges, loads in a plain lava-peft
and exports to HF PEFT (:func:`lava_peft.interop.export_peft`) like any other.

**Rank controller.**  The adapters built from one config object (one ``add_adapter``
call, i.e. one adapter name) share a :class:`RankSampler`: a counter-based generator
``b = r_min + H(seed, step, layer) mod (r − r_min + 1)`` (``H`` a 64-bit mixing hash;
``layer`` the adapter's index in construction order; ``"global"`` mode hashes no layer,
so every layer gets the same ``b``, clipped to its own ``r`` when ``rank_pattern`` gives
layers different ranks).  ``step`` counts forward passes and advances by itself
(:class:`~.factorized.StepCounter`: a new step begins when a layer that already drew in
the current step draws again), so the draws are reproducible from ``seed`` alone.
Re-computation under activation checkpointing (inside the backward pass) reuses the rank
of the forward instead of drawing.  ``sampler.step`` is not in the adapter file; the Trainer's
checkpoints keep it (``sampler_clocks``), elsewhere set it on :func:`~lava_peft.tools.dylora.rank_sampler` after loading.

Within one layer call the rank is drawn once, at the layer's first question to the
adapter (``uses_weight_path_for``, or ``forward``/``linear_factors`` for a mixed batch),
and used by whichever of ``linear_factors`` (fused Linear node), ``forward`` or
``delta_weight`` (conv weight path) then computes the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import LavaConfigError
from .factors import Factors
from .factorized import (FACTORIZATIONS, LAVA_FIELDS, FactorizedAdapter, FactorizedConfig,  # noqa: F401
                         StepCounter, in_backward, register_factorized, shared_per_config)
from .lava import LavaAdapter, LavaConfig
from .lora import LoraAdapter, LoraConfig

UPDATE_MODES = ("full", "frozen")
RANK_SAMPLING = ("per_layer", "global")


# =============================================================================== config
@dataclass
class DyLoraConfig(FactorizedConfig):
    """DyLoRA: ``r`` is ``r_max``; every rank in ``[r_min, r]`` is trained.

    Args:
        r_min: smallest rank drawn in training (1 ≤ r_min ≤ r, and ≤ every ``rank_pattern`` rank).
        factorization: ``"lora"`` (LoRA factors on every layer, convs flattened) or ``"lava"``
            (LAVA: LoRA form on matrices, CP on conv kernels, orthogonality regularizer).
        update: ``"full"`` (the first ``b`` components all learn) or ``"frozen"`` (only component ``b``).
        rank_sampling: ``"per_layer"`` (each layer draws its own ``b`` every step) or ``"global"``
            (one ``b`` per forward pass for every layer).
        seed: seed of the rank draws.
        eval_rank: the rank used outside training (merge, eval, ``delta_weight``); ``None``: ``r``.
            :func:`~lava_peft.tools.dylora.set_rank` sets it.
        init: ``"lora"``: ``"default"`` / ``"gaussian"`` (as :class:`LoraConfig`); ``"lava"``:
            ``"orthogonal"`` / ``"lora"`` (as :class:`LavaConfig`).  ``None``: the method's default.
        orth_lambda, orth_factors, spatial_init, conv_path: as in :class:`LavaConfig`; only for
            ``factorization="lava"`` (``None`` there means LAVA's default).

    With ``factorization="lava"`` the options left ``None`` are set to LAVA's defaults (and
    ``init`` to the factorization's default), so a saved config names them.
    """

    cli_help: ClassVar[str | None] = "DyLoRA on LAVA factors: every rank in [r_min, r] trained at once"
    cli_options: ClassVar[dict[str, tuple]] = {
        "r_min": (1, int, "dylora: the smallest rank trained"),
        "orth_lambda": LavaConfig.cli_options["orth_lambda"],
    }
    cli_notes: ClassVar[dict[str, str]] = {"rank": "the largest rank"}

    @classmethod
    def from_cli(cls, opts, common):
        return cls(r_min=opts["r_min"], factorization="lava", orth_lambda=opts["orth_lambda"], seed=opts["seed"],
                   **common)

    peft_export_refusal: ClassVar[str | None] = (
        "adapter {name!r} is a DyLoRA adapter (every rank at once); HF PEFT has no DyLoRA. Export it at one "
        "rank b: lava_peft.tools.dylora.save_at_rank(model, b, directory, peft=True)")

    r_min: int = 1
    update: str = "full"
    rank_sampling: str = "per_layer"
    seed: int = 0
    eval_rank: int | None = None
    init: str | None = None

    def __post_init__(self) -> None:
        plain = {"lora": (LoraConfig, ()), "lava": (LavaConfig, LAVA_FIELDS)}.get(self.factorization)
        if plain is not None:
            for key in ("init", *plain[1]):
                if getattr(self, key) is None:
                    setattr(self, key, plain[0].__dataclass_fields__[key].default)
            if self.factorization == "lava" and self.orth_factors is None:
                self.orth_factors = "in" if self.init == "lora" else "out"
        super().__post_init__()

    def validate_fields(self) -> None:
        if self.update not in UPDATE_MODES:
            raise LavaConfigError(
                f"DyLoraConfig.update must be 'full' (the first b components learn) or 'frozen' (only component b "
                f"learns); got {self.update!r}"
            )
        if self.rank_sampling not in RANK_SAMPLING:
            raise LavaConfigError(
                f"DyLoraConfig.rank_sampling must be 'per_layer' or 'global'; got {self.rank_sampling!r}"
            )
        if isinstance(self.r_min, bool) or not isinstance(self.r_min, int) or self.r_min <= 0:
            raise LavaConfigError(f"DyLoraConfig.r_min must be a positive integer; got {self.r_min!r}")
        ranks = {"r": self.r, **{f"rank_pattern[{k!r}]": v for k, v in self.rank_pattern.items()}}
        too_small = {k: v for k, v in ranks.items() if v < self.r_min}
        if too_small:
            raise LavaConfigError(
                f"DyLoraConfig.r_min={self.r_min} is larger than {too_small} (r is the largest rank trained); "
                f"lower r_min to at most {min(too_small.values())} or raise those ranks"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise LavaConfigError(f"DyLoraConfig.seed must be an integer; got {self.seed!r}")
        if self.eval_rank is not None:
            top = max(ranks.values())
            if isinstance(self.eval_rank, bool) or not isinstance(self.eval_rank, int) \
                    or not self.r_min <= self.eval_rank <= top:
                raise LavaConfigError(
                    f"DyLoraConfig.eval_rank must be an integer in [r_min, r] = [{self.r_min}, {top}] or None; "
                    f"got {self.eval_rank!r}"
                )


# =============================================================================== rank sampler
_MASK = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 finalizer applied per value): uniform, cheap, stateless."""
    z = 0x9E3779B97F4A7C15
    for v in values:
        z = (z + (v & _MASK) + 0x9E3779B97F4A7C15) & _MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        z ^= z >> 31
    return z


class RankSampler(StepCounter):
    """Draws the training rank of every (step, layer) for the adapters of one adapter name.

    ``b = r_min + H(seed, step, layer) mod (r_layer − r_min + 1)`` (``"per_layer"``) or
    ``min(r_layer, r_min + H(seed, step) mod (r_top − r_min + 1))`` (``"global"``, ``r_top``
    the largest layer rank).  ``step`` advances when a layer draws a second time
    (:class:`~.factorized.StepCounter`); it can be read or set to resume a run.
    """

    def __init__(self, seed: int, r_min: int, mode: str):
        super().__init__()
        self.seed, self.r_min, self.mode = int(seed), int(r_min), mode
        self._r_top = r_min

    def register(self, r: int) -> int:
        """A new layer of rank ``r`` joins; returns its index."""
        self._r_top = max(self._r_top, r)
        return super().register()

    def rank(self, step: int, layer: int, r: int) -> int:
        """The rank of ``layer`` (rank ``r``) at ``step`` (pure function)."""
        if self.mode == "global":
            return min(r, self.r_min + _mix(self.seed, step) % (self._r_top - self.r_min + 1))
        return self.r_min + _mix(self.seed, step, layer) % (r - self.r_min + 1)

    def draw(self, layer: int, r: int) -> int:
        return self.rank(self.tick(layer), layer, r)


# =============================================================================== adapters
class DyLoraAdapter(FactorizedAdapter):
    """The registered ``"dylora"`` adapter; constructing it gives a :class:`DyLoraLoraAdapter` or
    :class:`DyLoraLavaAdapter` (by ``config.factorization``), which subclass this class and
    :class:`LoraAdapter` / :class:`LavaAdapter`: the parameters, their init, their names in
    the file and the rank checks are the plain method's; this class truncates them.

    Attributes:
        fixed_rank: the rank outside training (``eval_rank`` clipped to this layer's ``r``).
        last_rank: the rank of this layer's most recent forward call.
    """

    def __init__(self, spec, config: DyLoraConfig, module_name: str):
        super().__init__(spec, config, module_name)
        self.r_min = config.r_min
        self.alpha = float(config.alpha_for(module_name))
        self.use_rslora = config.use_rslora
        self.update = config.update
        self.fixed_rank = min(config.eval_rank or self.r, self.r)
        self.last_rank: int | None = None
        self._armed: int | None = None  # rank drawn for the layer call in progress, not yet used
        self._sampler = shared_per_config(config, RankSampler, config.seed, config.r_min, config.rank_sampling)
        self._index = self._sampler.register(self.r)

    def step_clock(self) -> RankSampler:
        return self._sampler

    # -- ranks -------------------------------------------------------------------
    def scale_at(self, b: int) -> float:
        """``α/b`` (``α/√b`` with rsLoRA): the scale of the rank-``b`` truncation, as a plain
        adapter of rank ``b`` computes it."""
        return self.alpha / (b**0.5) if self.use_rslora else self.alpha / b

    def _raw_factors(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(up (O, r), modes)``: ``modes[0]`` the down factor ``(r, ·)``, then LAVA's ``P_k (r, K_k)``."""
        up, *modes = (self.factor(key) for key in self.factor_keys())
        return up, modes

    def truncated_factors(self, b: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The first ``b`` components: slices (``"full"``), or with components ``< b`` detached (``"frozen"``)."""
        up, modes = self._raw_factors()
        if self.update == "frozen" and b > 1 and torch.is_grad_enabled():
            up = torch.cat([up[:, :b - 1].detach(), up[:, b - 1:b]], dim=1)
            return up, [torch.cat([m[:b - 1].detach(), m[b - 1:b]], dim=0) for m in modes]
        return up[:, :b], [m[:b] for m in modes]

    def _enter(self) -> int:
        """The rank of a new layer call: drawn in training, else :attr:`fixed_rank`."""
        if not self.training:
            return self.fixed_rank
        if in_backward() and self.last_rank is not None:
            return self.last_rank  # checkpoint recomputation: the rank of the forward
        return self._sampler.draw(self._index, self.r)

    def _call_rank(self) -> int:
        """The rank of the layer call in progress (drawn now if the layer has not asked yet)."""
        b = self._armed if self._armed is not None else self._enter()
        self._armed = None
        self.last_rank = b
        return b

    def train(self, mode: bool = True):
        self._armed = None
        return super().train(mode)

    def uses_weight_path_for(self, x, layer) -> bool:
        self._armed = self._enter()  # the layer's first question in a call: the rank is drawn here
        return super().uses_weight_path_for(x, layer)

    # -- protocol ----------------------------------------------------------------
    def delta_weight(self, rank: int | None = None) -> torch.Tensor:
        """``ΔW`` at ``rank``; by default at the rank of the layer call in progress, else :attr:`fixed_rank`."""
        if rank is not None:
            _check_rank_value(rank, self.r_min, self.r, "delta_weight(rank)")
            b = rank
        else:
            b = self._call_rank() if self._armed is not None else self.fixed_rank
        up, modes = self.truncated_factors(b)
        return Factors(up * self.scale_at(b), modes).dense(self.spec.canonical_shape)

    def effective_factors(self) -> tuple[torch.Tensor, list[torch.Tensor], float]:
        """The factors of the layer call in progress: the first ``b`` components at scale ``α/b``
        (``b`` drawn now in training if the layer has not asked yet; :attr:`fixed_rank` outside it).
        The inherited LoRA / LAVA paths (factored forward, fused Linear node, separable CP conv) run on them."""
        b = self._call_rank()
        up, modes = self.truncated_factors(b)
        return up, modes, self.scale_at(b)

    def forward(self, x, base_out, layer):
        """The inherited forward at the rank of this call: armed here, so that whichever path it takes
        (:meth:`effective_factors`, or :meth:`delta_weight` for a conv's weight path) uses the same ``b``."""
        if self._armed is None:
            self._armed = self._enter()
        return super().forward(x, base_out, layer)

    def extra_repr(self) -> str:
        return (f"{self.plain_method}, r_min={self.r_min}, r={self.r}, update={self.update!r}, "
                f"fixed_rank={self.fixed_rank}")


class DyLoraLoraAdapter(DyLoraAdapter, LoraAdapter):
    """DyLoRA on LoRA factors ``lora_A (r, I·ΠK)``, ``lora_B (O, r)`` (convs flattened)."""


class DyLoraLavaAdapter(DyLoraAdapter, LavaAdapter):
    """DyLoRA on LAVA factors ``lava_U (O, r)``, ``lava_V (r, I)``, ``lava_P[k] (r, K_k)``: on a conv the
    first ``b`` CP components; the orthogonality term acts on the active components."""

    def regularized_factors(self) -> list[torch.Tensor]:
        """LAVA's factors restricted to the active components (the last forward's rank in training)."""
        b = self.last_rank if self.training and self.last_rank is not None else self.fixed_rank
        return self.orthogonality_terms(*self.truncated_factors(b))


register_factorized("dylora", DyLoraConfig, DyLoraAdapter, lora=DyLoraLoraAdapter, lava=DyLoraLavaAdapter)


# =============================================================================== rank checks
def _check_rank_value(b, r_min: int, r_max: int, what: str) -> None:
    if isinstance(b, bool) or not isinstance(b, int) or not r_min <= b <= r_max:
        raise LavaConfigError(
            f"{what}: rank {b!r} is outside the trained range [r_min, r] = [{r_min}, {r_max}]; choose an integer in it"
        )


__all__ = [
    "DyLoraAdapter",
    "DyLoraConfig",
    "DyLoraLavaAdapter",
    "DyLoraLoraAdapter",
    "RankSampler",
]
