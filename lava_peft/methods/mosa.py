"""MoSA — Mixture of Sparse Adapters ("Split & Merge", Zhang et al., arXiv 2312.02923) on LoRA / LAVA factors.

**Split.**  The adapter holds the factors of a plain LoRA (``factorization="lora"``:
``B (O, r)`` up, ``A (r, I·ΠK)`` down) or LAVA adapter (``"lava"``: ``U (O, r)``, ``V (r, I)``,
on convs ``P_m (r, K_m)``).  ``split`` picks the set ``S`` of factors that are split:
``"up"`` (``B`` / ``U``; default), ``"down"`` (``A`` / ``V``) or ``"all"``.  The entries of
every split factor ``F`` are partitioned by ``N = n_modules`` disjoint random masks::

    M_F^1 + … + M_F^N = 1,   M_F^j ⊙ M_F^k = 0 (j ≠ k),   |M_F^k| ∈ {⌊n_F/N⌋, ⌈n_F/N⌉}

and *module* ``k`` is ``{F ⊙ M_F^k : F ∈ S}`` together with the unsplit factors, which
every module shares.  The modules' factors sum to the full factors: ``Σ_k F ⊙ M_F^k = F``.

**Train.**  Each training forward, every layer uses one module ``k`` (see the controller
below); with ``c = N^|S|`` (``rescale=True``, default) or ``c = 1``::

    LoRA:  y = W0 x + b + c·s·(B ⊙ M_B^k)(A ⊙ M_A^k) x          (M = 1 for an unsplit factor)
    LAVA:  ΔW_train^k[o,i,k1..kN] = c·s·Σ_j (U⊙M_U^k)[o,j] (V⊙M_V^k)[j,i] Π_m (P_m⊙M_P^k)[j,k_m]

so ``∂L/∂F = M_F^k ⊙ (…)``: only module ``k``'s entries of a split factor get a gradient
from the loss (unsplit factors get their dense gradient).  ``rescale`` is the inverted-dropout
convention: with one split factor ``ΔW`` is linear in it, so ``E_k[ΔW_train^k] = (c/N)·ΔW = ΔW``
exactly, and the merged adapter computes what training computed on average.  (The
reference code keeps ``N`` copies of the split matrix, trains copy ``i`` on ``M_i`` only and
merges by *averaging* the copies; for a zero-initialised split factor — ``B``, the paper's
default ``SHARE=down`` — that is this formulation with ``rescale=True``, up to the
parametrization ``F = mean of the copies``.)  With several split factors the unbiasedness
holds in expectation over random partitions only.  ``rescale=False`` is the literal
"factor ⊙ mask" forward: training then sees on average ``1/N`` of the merged increment.

**Merge.**  The merged adapter is the full factors, ``ΔW = s·Δ(F)``.  With one split factor
it is the sum of the modules' increments, ``ΔW = Σ_k ΔW^k`` with ``ΔW^k = s·Δ(F ⊙ M^k)``
(:meth:`MosaAdapter.module_delta_weight`); with several, multilinearity gives the sum over
all ``N^|S|`` combinations of one part per factor instead.  Outside training
(``model.eval()``), and always for :meth:`~MosaAdapter.delta_weight`, merging, saving and
``regularization()``, a MoSA adapter *is* the plain adapter: the same code path on the same
tensors, so its outputs are bit-identical to the plain adapter and inference costs nothing
extra.  :func:`~lava_peft.tools.mosa.merge_modules` turns it into a plain ``"lora"`` / ``"lava"`` adapter (e.g. for
:func:`lava_peft.interop.export_peft`).

**Controller.**  The adapters built from one config object (one ``add_adapter`` call, i.e.
one adapter name) share a :class:`ModuleSampler`.  Module of layer ``ℓ`` at step ``t``::

    "per_layer" (default, as the reference code: every block draws its own module):
        k = g_t[ℓ],   g_t = randint(N, (L,)) from a generator seeded with (seed, t)
    "global": one module per forward for every layer, k = g_t[0]

— a pure function of ``(seed, t, ℓ)``, so a run is reproducible from ``seed`` alone and can
be resumed by setting ``sampler.step``.  ``t`` counts training forwards and advances by
itself (:class:`~.factorized.StepCounter`: a new step begins when a layer that already
drew in the current step draws again).  A layer draws exactly once per call, when it
computes its training contribution (``linear_factors()`` for the fused Linear node, else
``forward()``); evaluation forwards draw nothing.  Activation-checkpoint recomputation
(inside the backward pass) reuses the layer's latest module.  :func:`~lava_peft.tools.mosa.set_module` fixes one
module for every layer (for inspection and tests); the consistency objective asks for a
second forward whose module differs from the first one in every layer (``avoid``:
``k' = (k + 1 + o) mod N`` with ``o = randint(N − 1)`` from the same seeded generator,
uniform over the other ``N − 1`` modules).

**Masks are not saved.**  The partition of factor ``F`` of the layer at path ``p`` is the
permutation ``randperm(n_F)`` of a CPU generator seeded with
:func:`partition_seed` ``(seed, p, F)``, cut into ``N`` consecutive slices (the random score
of :func:`~lava_peft.methods.sparse_masks.random_scores` and
:func:`~lava_peft.methods.sparse_masks.non_overlapping_masks`); it is rebuilt when the
adapter is built or loaded and kept as a non-persistent ``uint8`` buffer (``module index``
per entry).  The file holds exactly the plain adapter's tensors.  Regeneration is safe even
if a future PyTorch changed ``randperm``: the masks never enter the function a saved
adapter computes (eval, merge and export use the full factors); they only decide which
entries later training steps update together.

**LAVA options.**  ``orth_lambda`` defaults to 0: the orthogonality term acts on the full
factors (the merged adapter), so its gradient is dense and would update every entry of a
split factor at every step.  On convs a training forward runs LAVA's separable CP chain
(LoRA: the base conv plus one conv with ``ΔW_train^k``); evaluation takes the plain paths.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import ClassVar
import torch

from ..errors import LavaConfigError
from .base import LayerSpec
from .cp_conv import cp_conv_separable
from .factors import Factors
from .factorized import (FACTORIZATIONS, FactorizedAdapter, FactorizedConfig, StepCounter,  # noqa: F401
                         in_backward, register_factorized, shared_per_config)
from .lava import LavaAdapter
from .lora import LoraAdapter
from .sparse_masks import MaskInputs, non_overlapping_masks, random_scores

SPLITS = ("up", "down", "all")
MODULE_SAMPLING = ("per_layer", "global")
_SEED_MOD = 2**63


# =============================================================================== config
@dataclass
class MosaConfig(FactorizedConfig):
    """MoSA on LoRA / LAVA factors.

    Args:
        n_modules: ``N`` ≥ 2, the number of sparse modules each split factor is partitioned into
            (every split factor of every layer needs at least ``N`` entries).
        factorization: ``"lora"`` or ``"lava"`` (LoRA form on matrices, CP on conv kernels).
        split: which factors are partitioned: ``"up"`` (``B``/``U``, the reference code's
            data-scarce default ``SHARE=down``), ``"down"`` (``A``/``V``) or ``"all"`` (every
            factor, LAVA's spatial ``P_m`` included); the others are shared, dense, by all modules.
        rescale: multiply the training increment by ``N`` per split factor (see the module
            docstring: the merged adapter then equals the training forward on average).
        seed: seed of the partitions and of the module draws.
        module_sampling: ``"per_layer"`` (each layer draws its module every training forward)
            or ``"global"`` (one module per forward for all layers).
        init: the factorization's ``init`` (LoRA ``"default"``/``"gaussian"``, LAVA
            ``"orthogonal"``/``"lora"``); ``None``: its default.
        orth_lambda, orth_factors, spatial_init, conv_path: LAVA's options (``factorization="lava"``
            only; ``None`` means LAVA's default).  ``orth_lambda`` defaults to 0 here.
    """

    cli_help: ClassVar[str | None] = "MoSA: LoRA factors split into sparse modules drawn per step"
    cli_options: ClassVar[dict[str, tuple]] = {
        "n_modules": (4, int, "mosa: number of sparse modules the adapter is split into"),
    }

    @classmethod
    def from_cli(cls, opts, common):
        return cls(n_modules=opts["n_modules"], seed=opts["seed"], **common)

    peft_export_refusal: ClassVar[str | None] = (
        "adapter {name!r} is a MoSA adapter (split into sparse modules while training); merge its modules "
        "into a plain LoRA/LAVA adapter first: lava_peft.tools.mosa.merge_modules(model, name), then export")

    n_modules: int = 4
    split: str = "up"
    rescale: bool = True
    seed: int = 0
    module_sampling: str = "per_layer"
    init: str | None = None
    orth_lambda: float = 0.0

    def validate_fields(self) -> None:
        if isinstance(self.n_modules, bool) or not isinstance(self.n_modules, int) or self.n_modules < 2:
            raise LavaConfigError(
                f"MosaConfig.n_modules must be an integer >= 2 (the number of sparse modules); got {self.n_modules!r}. "
                "With one module MoSA is the plain adapter: use LoraConfig / LavaConfig"
            )
        if self.split not in SPLITS:
            raise LavaConfigError(f"MosaConfig.split must be 'up', 'down' or 'all'; got {self.split!r}")
        if not isinstance(self.rescale, bool):
            raise LavaConfigError(f"MosaConfig.rescale must be True or False; got {self.rescale!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise LavaConfigError(f"MosaConfig.seed must be a non-negative integer; got {self.seed!r}")
        if self.module_sampling not in MODULE_SAMPLING:
            raise LavaConfigError(
                f"MosaConfig.module_sampling must be 'per_layer' (each layer draws its module) or 'global' (one "
                f"module per forward for every layer); got {self.module_sampling!r}"
            )


# =============================================================================== partitions
def partition_seed(seed: int, module_path: str, factor: str) -> int:
    """Seed of the partition of ``factor`` (e.g. ``"lora_B"``, ``"lava_P.0"``) of the layer at ``module_path``.

    ``(seed · 1000003 + crc32("<module_path>:<factor>")) mod 2^63``: stable across processes
    (unlike Python's ``hash``), different for every layer and factor.
    """
    return (int(seed) * 1_000_003 + zlib.crc32(f"{module_path}:{factor}".encode())) % _SEED_MOD


def partition(shape: tuple[int, ...], n_modules: int, seed: int) -> torch.Tensor:
    """Owner tensor of ``shape``: entry ``e`` belongs to module ``owner[e]`` (``uint8``).

    Module ``k`` gets the ``k``-th consecutive slice of ``randperm(numel)`` (seeded with
    ``seed``); slice sizes ``⌊n/N⌋ + [k < n mod N]``.
    """
    numel = math.prod(shape)
    if not 1 <= n_modules <= numel:
        raise LavaConfigError(f"cannot split {numel} entries into {n_modules} non-empty modules")
    base, extra = divmod(numel, n_modules)
    budgets = [base + (k < extra) for k in range(n_modules)]
    scores = random_scores(MaskInputs(tuple(shape), budget=numel, seed=seed))
    owner = torch.empty(numel, dtype=torch.uint8 if n_modules <= 256 else torch.int32)
    for k, idx in enumerate(non_overlapping_masks(scores, budgets)):
        owner[idx] = k
    return owner.view(tuple(shape))


def _owner_buffer(key: str) -> str:
    return "mosa_owner_" + key.replace(".", "_")


# =============================================================================== controller
class ModuleSampler(StepCounter):
    """Chooses the module of every (training forward, layer) for the adapters of one adapter name.

    ``module(t, ℓ)`` is a pure function of ``(seed, t, ℓ)`` (module docstring); ``draw(ℓ)``
    is what a layer calls once per training forward: it advances :attr:`step` when layer
    ``ℓ`` already drew in the current step.  Precedence: :attr:`avoid` (a module per layer
    that this forward must differ from), then :attr:`fixed` (:func:`~lava_peft.tools.mosa.set_module`), then the draw.

    Attributes:
        step: the index of the current training forward (set it to resume a run exactly).
        fixed: the module every layer uses, or ``None`` (random draws).
        avoid: ``{layer index: module}`` the next draws must differ from, or ``None``.
    """

    def __init__(self, seed: int, n_modules: int, mode: str):
        super().__init__()
        self.seed, self.n_modules, self.mode = int(seed), int(n_modules), mode
        self.fixed: int | None = None
        self.avoid: dict[int, int] | None = None
        self._cache: tuple | None = None

    def _draws(self, step: int) -> tuple[list[int], list[int]]:
        """``(g_t, o_t)``: per layer (one entry in ``"global"`` mode) a module and an offset in ``[0, N−1)``."""
        key = (step, self._n_layers)
        if self._cache is None or self._cache[0] != key:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % _SEED_MOD)
            width = 1 if self.mode == "global" else max(self._n_layers, 1)
            first = torch.randint(self.n_modules, (width,), generator=gen).tolist()
            offset = torch.randint(self.n_modules - 1, (width,), generator=gen).tolist()
            self._cache = (key, first, offset)
        return self._cache[1], self._cache[2]

    def module(self, step: int, layer: int, avoid: int | None = None) -> int:
        """The module of ``layer`` at ``step`` (pure); with ``avoid``, uniformly one of the other ``N − 1``."""
        first, offset = self._draws(step)
        i = 0 if self.mode == "global" else layer
        if avoid is None:
            return first[i]
        return (avoid + 1 + offset[i]) % self.n_modules

    def draw(self, layer: int) -> int:
        step = self.tick(layer)
        if self.avoid is not None and layer in self.avoid:
            return self.module(step, layer, self.avoid[layer])
        if self.fixed is not None:
            return self.fixed
        return self.module(step, layer)


# =============================================================================== adapters
class MosaAdapter(FactorizedAdapter):
    """The registered ``"mosa"`` adapter; constructing it gives a :class:`MosaLoraAdapter` or
    :class:`MosaLavaAdapter` (by ``config.factorization``).  Those subclass this class and
    :class:`LoraAdapter` / :class:`LavaAdapter`: parameters, init, file keys and rank checks
    are the plain method's, and outside training every inherited path runs unchanged.

    Attributes:
        split_keys: the split factors (``"lora_B"``, ``"lava_P.0"``, …).
        train_scale: ``c·s``, the scale of a training forward.
        last_module: the module of this layer's latest training forward (``None`` before one).
    """

    def __init__(self, spec: LayerSpec, config: MosaConfig, module_name: str):
        super().__init__(spec, config.plain_config(), module_name)
        self.n_modules = config.n_modules
        self.split_keys = _split_keys(type(self), config.split, self.factor_shapes(spec, self.r))
        self.train_scale = self.scale * (self.n_modules ** len(self.split_keys) if config.rescale else 1)
        for key in self.split_keys:
            seed = partition_seed(config.seed, module_name, key)
            owner = partition(tuple(self.factor(key).shape), self.n_modules, seed)
            self.register_buffer(_owner_buffer(key), owner, persistent=False)
        self.last_module: int | None = None
        self._sampler = shared_per_config(config, ModuleSampler, config.seed, config.n_modules, config.module_sampling)
        self._index = self._sampler.register()

    def step_clock(self) -> ModuleSampler:
        return self._sampler

    # -- factors -------------------------------------------------------------------
    @staticmethod
    def factor_shapes(spec: LayerSpec, r: int) -> dict[str, tuple[int, ...]]:  # pragma: no cover - abstract
        """``{factor key: shape}``, the up factor first, then the down factor (then LAVA's ``P_m``)."""
        raise NotImplementedError

    def module_mask(self, key: str, k: int) -> torch.Tensor:
        """``M_F^k`` (bool, the factor's shape) of split factor ``key``."""
        return self._buffers[_owner_buffer(key)] == k

    def module_factors(self, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(up, [down, P_1, …])`` as module ``k`` sees them: split factors ``⊙ M^k``, the others whole."""
        _check_module(k, self.n_modules, "module_factors")
        parts = [self.factor(key) * self.module_mask(key, k) if key in self.split_keys else self.factor(key)
                 for key in self.factor_shapes(self.spec, self.r)]
        return parts[0], parts[1:]

    def module_delta_weight(self, k: int, rescaled: bool = False) -> torch.Tensor:
        """``ΔW^k = s·Δ(F ⊙ M^k)``, module ``k``'s part of the merged increment (canonical layout);
        ``rescaled=True``: ``c·s·Δ(F ⊙ M^k)``, the increment of a training forward with module ``k``."""
        up, modes = self.module_factors(k)
        return Factors(up * (self.train_scale if rescaled else self.scale), modes).dense(self.spec.canonical_shape)

    # -- module choice -----------------------------------------------------------------
    def _enter(self) -> int:
        """The module of a training layer call (drawn; recomputation in backward reuses the latest)."""
        if in_backward() and self.last_module is not None:
            return self.last_module
        self.last_module = self._sampler.draw(self._index)
        return self.last_module

    # -- protocol ----------------------------------------------------------------------
    def uses_weight_path(self) -> bool:
        return False if self.training else super().uses_weight_path()

    def uses_weight_path_for(self, x, layer) -> bool:
        """In training the module's increment runs on the factored path (``delta_weight()`` stays the merged one)."""
        return False if self.training else super().uses_weight_path_for(x, layer)

    def effective_factors(self):
        """In training the module of this call (drawn now): its masked factors at ``c·s``; else the stored ones."""
        if not self.training:
            return super().effective_factors()
        up, modes = self.module_factors(self._enter())
        return up, modes, self.train_scale

    def delta_weight(self) -> torch.Tensor:
        """The merged increment (every module), in training too."""
        return self.delta_from_factors(*self.stored_factors())

    def forward(self, x, base_out, layer):
        if not self.training or self.spec.kind != "conv":
            return super().forward(x, base_out, layer)  # linear / embedding: on effective_factors()
        up, modes, _ = self.effective_factors()
        return self._train_conv(x, base_out, layer, up, modes)

    def _train_conv(self, x, base_out, layer, up, modes):
        """``base_out + conv(dropout(x); ΔW_train^k)`` (no bias)."""
        delta = Factors(up * self.train_scale, modes).dense(self.spec.canonical_shape)
        delta = delta.to(base_out.dtype)
        return base_out + layer.ops.forward_with_weight(layer.base_layer, self.dropout(x), delta, with_bias=False)

    @classmethod
    def check_layer(cls, spec: LayerSpec, config, module_name: str) -> None:
        super().check_layer(spec, config, module_name)
        concrete = cls.variants[config.factorization]
        shapes = concrete.factor_shapes(spec, config.rank_for(module_name))
        for key in _split_keys(concrete, config.split, shapes):
            numel = math.prod(shapes[key])
            if config.n_modules > numel:
                raise LavaConfigError(
                    f"MoSA n_modules={config.n_modules} is larger than the {key} factor {shapes[key]} ({numel} "
                    f"entries) of {module_name}: every module needs at least one entry. Lower n_modules to at most "
                    f"{numel}, raise r, or split another factor (split='up'/'down')"
                )

    def extra_repr(self) -> str:
        return (f"{self.plain_method}, n_modules={self.n_modules}, split={list(self.split_keys)}, "
                f"train_scale={self.train_scale:g}")


class MosaLoraAdapter(MosaAdapter, LoraAdapter):
    """MoSA on LoRA factors ``lora_B (O, r)`` (up), ``lora_A (r, I·ΠK)`` (down); convs flattened."""

    @staticmethod
    def factor_shapes(spec: LayerSpec, r: int) -> dict[str, tuple[int, ...]]:
        return {"lora_B": (spec.out_dim, r), "lora_A": (r, spec.in_dim * math.prod(spec.kernel_size))}


class MosaLavaAdapter(MosaAdapter, LavaAdapter):
    """MoSA on LAVA factors ``lava_U (O, r)``, ``lava_V (r, I)``, ``lava_P[m] (r, K_m)`` (CP on convs)."""

    @staticmethod
    def factor_shapes(spec: LayerSpec, r: int) -> dict[str, tuple[int, ...]]:
        shapes = {"lava_U": (spec.out_dim, r), "lava_V": (r, spec.in_dim)}
        shapes.update({f"lava_P.{m}": (r, k) for m, k in enumerate(spec.kernel_size)})
        return shapes

    def _train_conv(self, x, base_out, layer, up, modes):
        """The separable CP chain on the module's factors (``ΔW_train^k`` is never built)."""
        x_in = self.dropout(x) if self._dropout_active() else x
        return cp_conv_separable(x_in, up, modes[0], modes[1:], self.train_scale, layer.base_layer,
                                 base_out.dtype, base_out)


def _split_keys(cls: type[MosaAdapter], split: str, shapes: dict[str, tuple[int, ...]]) -> tuple[str, ...]:
    if split == "up":
        return (cls._UP,)
    if split == "down":
        return (cls._DOWN,)
    return tuple(shapes)


def _check_module(k, n_modules: int, what: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n_modules:
        raise LavaConfigError(f"{what}: module {k!r} does not exist; use an integer in [0, {n_modules - 1}]")


register_factorized("mosa", MosaConfig, MosaAdapter, lora=MosaLoraAdapter, lava=MosaLavaAdapter)


__all__ = [
    "ModuleSampler",
    "MosaAdapter",
    "MosaConfig",
    "MosaLavaAdapter",
    "MosaLoraAdapter",
    "partition",
    "partition_seed",
]
