"""MoSA on a bottleneck adapter, as in the reference code (Theia-4869/MoSA; Zhang et al., arXiv 2312.02923).

The adapter (AdaptFormer by default; Houlsby and Pfeiffer too) keeps, for every *split*
tensor ``T`` (``split="up"``: Up's weight and bias, the reference's data-scarce ``SHARE=down``;
``"down"``; ``"all"``: both, ``SHARE=none``), ``N`` **copies** ``T_1 … T_N``, all equal to the
plain adapter's init (Up = 0), and a partition of ``T``'s entries into ``N`` disjoint random
masks ``M_1 … M_N`` (:func:`~.mosa.partition`: ``N`` equal slices of a random permutation,
as the reference's quantile slices of a random score).  Unsplit tensors are shared, dense.

**Training forward** (per layer, every forward): draw ``i`` uniformly for Down and,
independently, ``j`` for Up (when both are split; the reference's ``A, B``), and run the
adapter with copies ``Down_i``, ``Up_j``.  The gradient of copy ``i`` is masked to ``M_i``
(``T_i ⊙ M_i + stop_grad(T_i ⊙ (1 − M_i))``: the value is ``T_i``, ``∂/∂T_i = g ⊙ M_i``, the
reference's ``p.grad *= p.mask`` after backward).  A copy that is not drawn is not in the graph:
its gradient stays ``None`` and ``torch.optim`` skips it — no step, no weight decay, no moment
update (optimizer state included; with ``zero_grad(set_to_none=True)``, PyTorch's default).

**Merge** (every evaluation forward, :func:`~lava_peft.tools.mosa.merge_modules`): the *mean*
of the copies, ``T = (1/N) Σ_i T_i`` (the reference's ``merge(mode="add")``: sum, then divide
by ``N``).  Saved files hold the copies (training can resume); ``merge_modules`` turns the
adapter into the plain bottleneck adapter of the merged tensors.

**Sampler**: the :class:`~.mosa.ModuleSampler` shared by the layers of one adapter name, a
pure function of ``(seed, step, draw index)``; each layer registers one draw index per split
projection.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LavaConfigError
from .base import ModuleSpec
from .bottleneck import BottleneckAdapter
from .factorized import in_backward, shared_per_config
from .mosa_sampling import ModuleSampler, partition, partition_seed


def masked_gradient(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``tensor`` in value, with gradient ``g ⊙ mask`` (mask: bool)."""
    keep = mask.to(tensor.dtype)
    return tensor * keep + (tensor * (1 - keep)).detach()


class MosaBottleneckAdapter(BottleneckAdapter):
    """A bottleneck adapter whose split tensors are ``N`` masked copies (module docstring)."""

    def __init__(self, spec: ModuleSpec, config, module_name: str):
        super().__init__(spec, config.bottleneck_config(), module_name)
        self.n_modules = config.n_modules
        projections = {"zero": ("up",), "up": ("up",), "down": ("down",), "all": ("down", "up")}[config.split]
        self.split_keys = tuple(f"{p}_{t}" for p in projections for t in ("weight", "bias")
                                if self._parameters.get(f"{p}_{t}") is not None)
        for key in self.split_keys:
            template = self._parameters.pop(key)
            copies = nn.ParameterList([nn.Parameter(template.detach().clone()) for _ in range(self.n_modules)])
            self.add_module(f"{key}_copies", copies)
            owner = partition(tuple(template.shape), self.n_modules, partition_seed(config.seed, module_name, key))
            self.register_buffer(f"{key}_owner", owner, persistent=False)
        self._sampler = shared_per_config(config, ModuleSampler, config.seed, config.n_modules, config.module_sampling)
        self.draw_index = {p: self._sampler.register() for p in projections}
        self.last_draws: dict[str, int] = {}

    def step_clock(self):
        return self._sampler

    def copies(self, key: str) -> nn.ParameterList:
        return self._modules[f"{key}_copies"]

    def merged(self, key: str) -> torch.Tensor:
        """``(1/N) Σ_i T_i``: the merged tensor (eval forwards, ``merge_modules``)."""
        return torch.stack(list(self.copies(key))).mean(0)

    def module_mask(self, key: str, i: int) -> torch.Tensor:
        return self._buffers[f"{key}_owner"] == i

    def _draw(self, projection: str) -> int:
        if in_backward() and projection in self.last_draws:
            return self.last_draws[projection]
        self.last_draws[projection] = self._sampler.draw(self.draw_index[projection])
        return self.last_draws[projection]

    def _tensor(self, key: str, projection: str, i: int | None):
        if key not in self.split_keys:
            return self._parameters[key] if key in self._parameters else None
        if i is None:
            return self.merged(key)
        return masked_gradient(self.copies(key)[i], self.module_mask(key, i))

    def _projection(self, projection: str):
        split = any(k.startswith(projection) for k in self.split_keys)
        i = self._draw(projection) if split and self.training and torch.is_grad_enabled() else None
        return self._tensor(f"{projection}_weight", projection, i), self._tensor(f"{projection}_bias", projection, i)

    def down(self):
        return self._projection("down")

    def up(self):
        return self._projection("up")

    def merged_state(self) -> dict[str, torch.Tensor]:
        """The plain bottleneck adapter's state dict: split tensors replaced by the mean of their copies."""
        state = {k: v for k, v in self.state_dict().items() if "_copies." not in k}
        state.update({key: self.merged(key).detach().clone() for key in self.split_keys})
        return state

    @classmethod
    def check_module(cls, spec: ModuleSpec, config, module_name: str) -> None:
        super().check_module(spec, config.bottleneck_config(), module_name)
        r = config.rank_for(module_name)
        smallest = min(r, spec.out_dim)  # the bias of Down has r entries, of Up out_dim
        if config.n_modules > smallest:
            raise LavaConfigError(f"MoSA n_modules={config.n_modules} is larger than the smallest split tensor of "
                                  f"{module_name} ({smallest} entries); lower n_modules or raise r")

    @classmethod
    def for_module(cls, spec: ModuleSpec, config, module_name: str):
        return cls(spec, config, module_name)

    @classmethod
    def extra_targets(cls, config) -> list[str]:
        return []

    def extra_repr(self) -> str:
        return super().extra_repr() + f", n_modules={self.n_modules}, split={list(self.split_keys)}"
