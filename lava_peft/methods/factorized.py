"""What the methods built on LoRA or LAVA factors share (DyLoRA, MoSA, low-bit).

Such a method keeps the factors of a plain ``"lora"`` or ``"lava"`` adapter and changes
what it hands to the inherited code (truncated, masked, fake-quantized factors).  The
parts that do not depend on that change live here:

* :class:`FactorizedConfig` — ``factorization="lora"|"lava"``, LAVA's options and their
  checks, :meth:`~FactorizedConfig.plain_config` (the matching :class:`LoraConfig` /
  :class:`LavaConfig`) and the regularizer weight;
* :class:`FactorizedAdapter` and :func:`register_factorized` — the registered adapter class
  whose ``for_layer`` builds its LoRA- or LAVA-based variant, and factor access by key;
* :class:`StepCounter`, :func:`shared_per_config`, :func:`in_backward` — the training-step
  clock of a sampler shared by the layers of one adapter name (the adapters return it from
  ``step_clock()``; :meth:`~lava_peft.AdaptedModel.sampler_state` saves it in checkpoints).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..config import AdapterConfig, register_method
from ..errors import LavaConfigError, LavaError
from .base import DeltaAdapter
from .lava import LavaAdapter, LavaConfig
from .lora import LoraAdapter, LoraConfig

FACTOR_INITS = {"lora": ("default", "gaussian"), "lava": ("orthogonal", "lora")}
"""The ``init`` values of :class:`LoraConfig` / :class:`LavaConfig`."""
FACTORIZATIONS = tuple(FACTOR_INITS)
LAVA_FIELDS = ("orth_lambda", "orth_factors", "spatial_init", "conv_path")
# per factorization: plain adapter class, up factor, down factor (then LAVA's ``lava_P.<k>``)
_PLAIN = {"lora": (LoraAdapter, "lora_B", "lora_A"), "lava": (LavaAdapter, "lava_U", "lava_V")}

T = TypeVar("T")


# =============================================================================== config
@dataclass
class FactorizedConfig(AdapterConfig):
    """Base config of a method on LoRA / LAVA factors.

    Args:
        factorization: ``"lora"`` (LoRA factors on every layer, convs flattened) or ``"lava"``
            (LoRA form on matrices, CP on conv kernels, orthogonality regularizer).
        orth_lambda, orth_factors, spatial_init, conv_path: as in :class:`LavaConfig`, for
            ``factorization="lava"`` only; ``None`` means LAVA's default.

    A subclass declares the field holding the factorization's ``init``
    (:attr:`factor_init_field`; ``None`` there means the factorization's default), may
    narrow :attr:`lava_only` (the LAVA fields a ``"lora"`` config must leave at their
    defaults), and adds its own checks in :meth:`validate_fields`.
    """

    factor_init_field: ClassVar[str] = "init"
    lava_only: ClassVar[tuple[str, ...]] = LAVA_FIELDS

    factorization: str = "lora"
    orth_lambda: float | None = None
    orth_factors: str | None = None
    spatial_init: str | None = None
    conv_path: str | None = None

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.factorization not in FACTORIZATIONS:
            raise LavaConfigError(f"{name}.factorization must be 'lora' or 'lava'; got {self.factorization!r}")
        self.validate_fields()
        if self.factorization == "lora":
            fields = type(self).__dataclass_fields__
            extra = [k for k in self.lava_only if getattr(self, k) != fields[k].default]
            if extra:
                raise LavaConfigError(
                    f"{name} fields {extra} apply to factorization='lava' only; drop them or set factorization='lava'"
                )
        init, allowed = getattr(self, self.factor_init_field), FACTOR_INITS[self.factorization]
        if init is not None and init not in allowed:
            plain = "LavaConfig" if self.factorization == "lava" else "LoraConfig"
            raise LavaConfigError(
                f"{name}.{self.factor_init_field} for factorization={self.factorization!r} must be one of {allowed} "
                f"(as {plain}.init) or None; got {init!r}"
            )
        try:
            self.plain_config()  # the factorization's own checks (orth_factors, conv_path, ...)
        except LavaConfigError as exc:
            raise LavaConfigError(f"{name}(factorization={self.factorization!r}): {exc}") from None

    def validate_fields(self) -> None:
        """The method's own checks (run after ``factorization``'s, before LAVA's options)."""

    def plain_config(self, **changes: Any) -> LoraConfig | LavaConfig:
        """The :class:`LoraConfig` / :class:`LavaConfig` with this config's fields (and ``changes``);
        an option left ``None`` takes that config's default."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(AdapterConfig)}
        lava = self.factorization == "lava"
        own = {"init": getattr(self, self.factor_init_field), **{k: getattr(self, k) for k in LAVA_FIELDS if lava}}
        own = {k: v for k, v in own.items() if v is not None}
        return (LavaConfig if lava else LoraConfig)(**{**shared, **own, **changes})

    def regularization_weight(self) -> float:
        return float(self.orth_lambda) if self.factorization == "lava" else 0.0


# =============================================================================== adapters
def factor_parameter(adapter: nn.Module, key: str) -> nn.Parameter:
    """The parameter ``key`` (``"lora_A"``, ``"lava_P.0"``, …) of a LoRA / LAVA adapter, as stored."""
    owner, _, name = key.rpartition(".")
    return (adapter._modules[owner] if owner else adapter)._parameters[name]


class FactorizedAdapter(DeltaAdapter):
    """Base of the registered adapter class of a method on LoRA / LAVA factors.

    :meth:`for_layer` on the registered class (see :func:`register_factorized`) builds its variant
    for ``config.factorization``: a subclass of it and of :class:`LoraAdapter` /
    :class:`LavaAdapter`, whose parameters, init, file keys and rank checks are the plain
    method's.  A variant gets :attr:`plain_method`, :attr:`plain_class` and the keys of its
    up / down factors (``_UP``, ``_DOWN``) from the plain class it subclasses.
    """

    variants: ClassVar[dict[str, type]]  # on the registered class only: {"lora": ..., "lava": ...}
    plain_method = "base"
    plain_class: type[DeltaAdapter] = DeltaAdapter
    _UP = _DOWN = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for method, (plain, up, down) in _PLAIN.items():
            if issubclass(cls, plain):
                cls.plain_method, cls.plain_class, cls._UP, cls._DOWN = method, plain, up, down

    @classmethod
    def for_layer(cls, spec, config, module_name: str) -> "FactorizedAdapter":
        """The variant of the registered class for ``config.factorization`` (the explicit dispatch hook)."""
        if "variants" in cls.__dict__:
            cls = cls.variants[config.factorization]
        return cls(spec, config, module_name)

    def __init__(self, spec, config, module_name: str):
        if "variants" in type(self).__dict__:
            raise LavaError(
                f"{type(self).__name__} is the registered class of a method on LoRA/LAVA factors; build a layer's "
                f"adapter with {type(self).__name__}.for_layer(spec, config, name), which picks the variant of "
                "config.factorization"
            )
        super().__init__(spec, config, module_name)

    @classmethod
    def check_layer(cls, spec, config, module_name: str) -> None:
        cls.variants[config.factorization].plain_class.check_layer(spec, config, module_name)

    def factor_keys(self) -> tuple[str, ...]:
        """The factors: up (``lora_B`` / ``lava_U``), down (``lora_A`` / ``lava_V``), then LAVA's ``lava_P.<k>``."""
        n_spatial = len(self._modules.get("lava_P", ()))
        return (self._UP, self._DOWN, *(f"lava_P.{k}" for k in range(n_spatial)))

    def factor(self, key: str) -> nn.Parameter:
        """The parameter ``key`` (``"lora_A"``, ``"lava_P.0"``, …): the full, stored factor."""
        return factor_parameter(self, key)

    def stored_factors(self) -> tuple[torch.Tensor, list[torch.Tensor], float]:
        """``(up, [down, P_1, …], scale)`` as stored: the plain method's :meth:`effective_factors`,
        before this method's change (truncation, masks, quantization)."""
        return self.plain_class.effective_factors(self)


def register_factorized(name: str, config_cls: type[FactorizedConfig], adapter_cls: type[FactorizedAdapter],
                        lora: type[FactorizedAdapter], lava: type[FactorizedAdapter]) -> None:
    """Register method ``name``; ``adapter_cls.for_layer`` builds ``lora`` or ``lava`` by ``config.factorization``."""
    adapter_cls.variants = {"lora": lora, "lava": lava}
    register_method(name, config_cls, adapter_cls)


# =============================================================================== training-step clock
class StepCounter:
    """The training-step clock of the layers of one adapter name (base of their sampler).

    :attr:`step` counts training forwards and advances by itself: a new step begins when a
    layer that already drew in the current step draws again.  That needs no hook in the
    model (every adapted layer runs once per forward pass of an ordinary model) and makes
    each draw independent of call order; a layer called twice in one forward (shared
    weights) starts a new step for the layers after it.  Set :attr:`step` to resume a run.
    """

    def __init__(self) -> None:
        self.step = 0
        self._n_layers = 0
        self._drawn: set[int] = set()

    def register(self) -> int:
        """A new layer joins; returns its index."""
        self._n_layers += 1
        return self._n_layers - 1

    def next_step(self) -> int:
        """The step the next training draw belongs to (what a checkpoint keeps)."""
        return self.step + (1 if self._drawn else 0)

    def resume_at(self, step: int) -> None:
        """Continue so that the next training draw belongs to ``step`` (a checkpoint's :meth:`next_step`)."""
        self.step = int(step)
        self._drawn.clear()

    def tick(self, layer: int) -> int:
        """Layer ``layer`` draws now; returns the step the draw belongs to."""
        if layer in self._drawn:
            self.step += 1
            self._drawn.clear()
        self._drawn.add(layer)
        return self.step


def shared_per_config(config: AdapterConfig, cls: type[T], *args: Any) -> T:
    """``cls(*args)``, shared by the adapters built from ``config`` (one ``add_adapter`` call,
    i.e. one adapter name): kept on the config object, never saved; a new one when
    ``cls`` or ``args`` differ from the held one's."""
    held = config.__dict__.get("_shared_runtime")
    if held is None or held[0] != (cls, args):
        held = ((cls, args), cls(*args))
        config.__dict__["_shared_runtime"] = held
    return held[1]


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation-checkpoint recomputation)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


__all__ = [
    "FACTORIZATIONS",
    "FactorizedAdapter",
    "FactorizedConfig",
    "StepCounter",
    "factor_parameter",
    "in_backward",
    "register_factorized",
    "shared_per_config",
]
