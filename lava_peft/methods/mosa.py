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
extra.  :func:`merge_modules` turns it into a plain ``"lora"`` / ``"lava"`` adapter (e.g. for
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
(inside the backward pass) reuses the layer's latest module.  :func:`set_module` fixes one
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
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..combine import Factors
from ..errors import LavaConfigError, LavaError
from ..inject import adapted_layers
from ..layers import LayerSpec
from .base import _dropout_active, lowrank_forward
from .cp_conv import cp_conv_separable
from .factorized import (FACTORIZATIONS, FactorizedAdapter, FactorizedConfig, StepCounter,  # noqa: F401
                         adapter_of_method, in_backward, register_factorized, shared_per_config)
from .lava import LavaAdapter, LavaConfig
from .lora import LoraAdapter, LoraConfig
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
    that this forward must differ from), then :attr:`fixed` (:func:`set_module`), then the draw.

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

    def linear_factors(self):
        if not self.training:
            return super().linear_factors()
        if self.spec.kind != "linear" or _dropout_active(self):
            return None  # no draw: forward() will draw
        up, modes = self.module_factors(self._enter())
        return modes[0], up, self.train_scale

    def forward(self, x, base_out, layer):
        if not self.training:
            return super().forward(x, base_out, layer)
        up, modes = self.module_factors(self._enter())
        if self.spec.kind == "conv":
            return self._train_conv(x, base_out, layer, up, modes)
        return lowrank_forward(x, modes[0], up, self.train_scale, self, base_out.dtype, base_out)

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


# =============================================================================== model-level API
def _unwrap(model):
    from ..train.checkpoint import unwrap  # lazy: lava_peft.train imports the package root

    return unwrap(model)


def _mosa(model, adapter_name: str | None):
    """``(name, config, [(path, adapter)])`` of a MoSA adapter of ``model``."""
    return adapter_of_method(_unwrap(model), adapter_name, MosaConfig, "this")


def module_sampler(model, adapter_name: str | None = None) -> ModuleSampler:
    """The :class:`ModuleSampler` shared by the layers of a MoSA adapter (``.step`` to inspect or resume)."""
    _, _, layers = _mosa(model, adapter_name)
    return layers[0][1]._sampler


def set_module(model, k: int | None, adapter_name: str | None = None) -> None:
    """Make every layer of MoSA adapter ``adapter_name`` use module ``k`` in training forwards
    (``None``: random draws again).  Evaluation always uses the merged (full) adapter.
    Raises :class:`LavaConfigError` (changing nothing) for ``k`` outside ``[0, n_modules)``."""
    _, config, layers = _mosa(model, adapter_name)
    if k is not None:
        _check_module(k, config.n_modules, "set_module")
    layers[0][1]._sampler.fixed = k


def merge_modules(model, adapter_name: str | None = None) -> LoraConfig | LavaConfig:
    """Turn MoSA adapter ``adapter_name`` into the plain ``"lora"`` / ``"lava"`` adapter of its full factors.

    The sum of the modules is the full factors, so each layer gets a plain adapter with the
    same tensors (same name, rank, scale, dropout; ``modules_to_save`` copies and the
    active / merged / trainable state are kept).  Its outputs equal the MoSA adapter's
    evaluation outputs bit for bit; it saves, loads in any lava-peft and exports to HF PEFT
    (:func:`lava_peft.interop.export_peft`) like any plain adapter.  Training it further is
    dense (plain) training.  Returns the new config; nothing changes on error.
    """
    model = _unwrap(model)
    name, config, layers = _mosa(model, adapter_name)
    plain = config.plain_config()
    new = {}
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the plain init's draws are overwritten
        for path, old in layers:
            adapter = old.plain_class(old.spec, plain, path)
            adapter.load_state_dict(old.state_dict())
            adapter.to(device=old.factor(old._UP).device)
            adapter.train(old.training)
            new[path] = adapter
    for path, layer in adapted_layers(model.model):
        if path in new:
            layer.adapters[name] = new[path]
    model.peft_config[name] = plain
    model._apply_active(model.active_adapters)  # requires_grad by name, as for any adapter
    return plain


# =============================================================================== consistency objective
class ConsistencyOutput(NamedTuple):
    """``loss``: the symmetric KL between the two forwards; ``logits_a`` / ``logits_b``: their outputs."""

    loss: torch.Tensor
    logits_a: torch.Tensor
    logits_b: torch.Tensor


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``½[KL(p_a‖p_b) + KL(p_b‖p_a)] = ½ Σ_c (p_a − p_b)(log p_a − log p_b)`` per row, averaged over rows.

    Rows are all leading dimensions (``[B, C]`` or token-level ``[B, T, C]``); ``mask``
    (the rows' shape) keeps only the rows where it is true.  Computed in fp32 from
    ``log_softmax``; 0 (with a gradient) when no row is kept.
    """
    if logits_a.shape != logits_b.shape:
        raise LavaConfigError(f"symmetric_kl needs logits of equal shape; got {tuple(logits_a.shape)} and "
                              f"{tuple(logits_b.shape)}")
    a = logits_a.float().reshape(-1, logits_a.shape[-1])
    b = logits_b.float().reshape(-1, logits_b.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1).to(device=a.device, dtype=torch.bool)
        a, b = a[keep], b[keep]
    if a.shape[0] == 0:
        return (a.sum() + b.sum()) * 0.0
    la, lb = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
    return 0.5 * ((la.exp() - lb.exp()) * (la - lb)).sum(-1).mean()


def _active_samplers(model, adapter_name: str | None) -> list[tuple[ModuleSampler, list]]:
    if adapter_name is not None:
        _, _, layers = _mosa(model, adapter_name)
        return [(layers[0][1]._sampler, [a for _, a in layers])]
    out = []
    for name in model.active_adapters:
        if isinstance(model.peft_config[name], MosaConfig):
            layers = [a for _, a in model.adapter_layers(name)]
            out.append((layers[0]._sampler, layers))
    if not out:
        raise LavaConfigError(
            f"the model has no active MoSA adapter (active: {model.active_adapters}); the consistency loss needs one"
        )
    return out


def mosa_consistency_loss(model, batch, forward_fn: Callable | None = None, adapter_name: str | None = None,
                          modules: tuple[int, int] | None = None) -> ConsistencyOutput:
    """Two training forwards of ``batch`` with different modules and the symmetric KL between them.

    Forward A draws its modules as usual; forward B uses, in every layer, a module drawn
    uniformly among the ``N − 1`` others (``modules=(ka, kb)`` instead fixes module ``ka``
    then ``kb`` in every layer).  Base-model dropout also differs between the two, as in
    R-Drop.  The reference objective is ``CE(logits_a, y) + 1.0·loss`` (no CE on B):
    :func:`mosa_loss_fn` builds it for :class:`lava_peft.Trainer`.

    Args:
        model: the :class:`~lava_peft.AdaptedModel` (or its DDP wrapper), in training mode.
        batch: what ``forward_fn`` takes.
        forward_fn: ``forward_fn(model, batch) -> logits``; default
            :func:`lava_peft.train.trainer.default_forward`.
        adapter_name: the MoSA adapter whose modules differ; default every active MoSA adapter.
        modules: ``(ka, kb)`` to fix both forwards' modules (``ka == kb`` gives a KL of 0
            without base dropout).

    Token-level logits ``[B, T, C]`` with ``batch["labels"]`` of shape ``[B, T]`` skip the rows
    labelled ``-100``.  Activation checkpointing is refused: its recomputation would run
    forward A with forward B's modules.
    """
    from ..train.trainer import default_forward  # lazy: lava_peft.train imports the package root

    forward_fn = forward_fn or default_forward
    inner = _unwrap(model)
    groups = _active_samplers(inner, adapter_name)
    if not all(a.training for _, layers in groups for a in layers):
        raise LavaError("mosa_consistency_loss compares two training forwards; call model.train() first "
                        "(in eval mode both forwards use the merged adapter)")
    if any(getattr(m, "gradient_checkpointing", False) is True for m in inner.modules()):  # transformers' flag
        raise LavaConfigError(
            "mosa_consistency_loss runs two forwards with different modules before one backward; activation "
            "checkpointing would recompute forward A with forward B's modules. Disable gradient checkpointing "
            "or train without the consistency term"
        )
    if modules is not None:
        if not isinstance(modules, (tuple, list)) or len(modules) != 2:
            raise LavaConfigError(f"modules must be a pair (ka, kb); got {modules!r}")
        for sampler, _ in groups:
            for k in modules:
                _check_module(k, sampler.n_modules, "mosa_consistency_loss(modules=...)")
    before = [sampler.fixed for sampler, _ in groups]
    try:
        if modules is not None:
            for sampler, _ in groups:
                sampler.fixed = modules[0]
        logits_a = forward_fn(model, batch)
        for sampler, layers in groups:
            if modules is not None:
                sampler.fixed = modules[1]
            else:
                sampler.avoid = {a._index: a.last_module for a in layers if a.last_module is not None}
        logits_b = forward_fn(model, batch)
    finally:
        for (sampler, _), fixed in zip(groups, before):
            sampler.avoid = None
            sampler.fixed = fixed
    mask = None
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if isinstance(labels, torch.Tensor) and logits_a.dim() > 2 and tuple(labels.shape) == tuple(logits_a.shape[:-1]):
        mask = labels != -100
    return ConsistencyOutput(symmetric_kl(logits_a, logits_b, mask), logits_a, logits_b)


def mosa_loss_fn(weight: float = 1.0, forward_fn: Callable | None = None,
                 task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 adapter_name: str | None = None) -> Callable:
    """A ``loss_fn(model, batch) -> (loss, logits)`` for :class:`lava_peft.Trainer` (its objective hook).

    Training: ``task_loss(logits_a, labels) + weight · symmetric KL`` from
    :func:`mosa_consistency_loss` (logits of forward A are reported).  Evaluation (the
    model in eval mode): ``task_loss`` of one forward with the merged adapter.  Defaults:
    ``default_forward`` and ``classification_loss`` of :mod:`lava_peft.train.trainer`.
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise LavaConfigError(f"mosa_loss_fn weight must be a finite number >= 0; got {weight!r}")

    def loss_fn(model, batch):
        from ..train.trainer import classification_loss, default_forward

        fwd = forward_fn or default_forward
        task = task_loss or classification_loss
        if not model.training:
            logits = fwd(model, batch)
            return task(logits, batch["labels"]), logits
        out = mosa_consistency_loss(model, batch, fwd, adapter_name)
        return task(out.logits_a, batch["labels"]) + weight * out.loss, out.logits_a

    return loss_fn


__all__ = [
    "ConsistencyOutput",
    "ModuleSampler",
    "MosaAdapter",
    "MosaConfig",
    "MosaLavaAdapter",
    "MosaLoraAdapter",
    "merge_modules",
    "module_sampler",
    "mosa_consistency_loss",
    "mosa_loss_fn",
    "partition",
    "partition_seed",
    "set_module",
    "symmetric_kl",
]
