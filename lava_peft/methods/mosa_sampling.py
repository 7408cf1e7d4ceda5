"""MoSA's partitions and module sampler, shared by the factor variant (:mod:`.mosa`) and the
bottleneck variant (:mod:`.bottleneck_mosa`)."""

from __future__ import annotations

import math
import zlib

import torch

from ..errors import LavaConfigError
from .factorized import StepCounter
from .sparse_masks import MaskInputs, non_overlapping_masks, random_scores

_SEED_MOD = 2**63


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
