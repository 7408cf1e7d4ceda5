"""Adapter configs: one dataclass base, JSON round trip, validation and the method registry.

Every method subclasses :class:`AdapterConfig` and registers itself with
:func:`register_method`, naming its config class and its adapter class.  The rest of
the library (injection, save/load, the CLI) only ever looks methods up here.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import AdapterFileError, LavaConfigError

FORMAT_VERSION = 1
"""Version of the on-disk adapter format (``adapter_config.json`` / safetensors layout)."""

_REGISTRY: dict[str, tuple[type["AdapterConfig"], type]] = {}


def register_method(name: str, config_cls: type["AdapterConfig"], adapter_cls: type) -> None:
    """Register a method under ``name`` (the ``method`` field of saved configs)."""
    config_cls.method = name
    _REGISTRY[name] = (config_cls, adapter_cls)


def registered_methods() -> list[str]:
    return sorted(_REGISTRY)


def config_class(method: str) -> type["AdapterConfig"]:
    try:
        return _REGISTRY[method][0]
    except KeyError:
        raise AdapterFileError(
            f"unknown adapter method {method!r}; this lava-peft knows {registered_methods()}. "
            "The file may come from a newer lava-peft: upgrade with `pip install -U lava-peft`."
        ) from None


def adapter_class(method: str) -> type:
    config_class(method)
    return _REGISTRY[method][1]


def method_hook(reference: str):
    """The function a config's extension point names (``"package.module:function"``), imported on use.

    Hooks name their function instead of importing it so that a method's file (at the bottom of
    the layers) can declare features implemented above the model (PEFT formats, CLI setup).
    """
    module_name, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def normalize_targets(targets: Any) -> str | list[str] | None:
    """Turn ``target_modules`` into JSON-storable form.

    A layer type (e.g. ``nn.Conv2d``) in a list becomes the string ``"type:Conv2d"``.
    """
    if targets is None or isinstance(targets, str):
        return targets
    if isinstance(targets, type):
        targets = [targets]
    out = []
    for t in targets:
        if isinstance(t, type):
            out.append(f"type:{t.__name__}")
        elif isinstance(t, str):
            out.append(t)
        else:
            raise LavaConfigError(
                f"target_modules entries must be module names, regex strings or layer types "
                f"(e.g. torch.nn.Conv2d); got {t!r} of type {type(t).__name__}"
            )
    return out


@dataclass
class AdapterConfig:
    """Fields shared by every method.

    Args:
        target_modules: which modules to adapt. A list of names or name suffixes
            (``["query", "value"]`` matches ``...attention.self.query``), layer types
            (``[nn.Conv2d]``), a regex string matched against the full module name,
            or one of the keywords ``"all-linear"`` (every Linear / GPT-2 Conv1D except
            the output head), ``"all-conv"`` (every Conv1d/2d/3d) and ``"all"`` (both).
        exclude_modules: names/suffixes/regex of modules never to adapt.
        modules_to_save: modules (names or suffixes) trained fully and saved with the
            adapter, e.g. a new classification head ``["classifier"]``.
        r: rank (number of rank-1 components).
        alpha: scale numerator; the increment is multiplied by ``alpha / r``.
        rank_pattern / alpha_pattern: per-module overrides, keyed by name suffix or regex.
        dropout: dropout on the adapter's input (unmerged path only).
        use_rslora: use ``alpha / sqrt(r)`` as the scale.
    """

    method: ClassVar[str] = "base"

    # -- extension points, read through the registry (a method's config overrides them) -----------
    #: ``"module:function"`` that writes an adapter of this method as a HF PEFT directory
    #: (``fn(model, directory, adapter_name, base_model_name_or_path)``); ``None``: the LoRA export
    #: through the method's factor view (:mod:`lava_peft.interop`)
    peft_export: ClassVar[str | None] = None
    #: why :func:`~lava_peft.interop.export_peft` refuses this method (``{name}``: the adapter), or ``None``
    peft_export_refusal: ClassVar[str | None] = None
    #: HF PEFT ``peft_type`` this method imports, and the ``"module:function"`` doing it
    #: (``fn(model, directory, peft_config, tensors, adapter_name, is_trainable)``)
    peft_type: ClassVar[str | None] = None
    peft_import: ClassVar[str | None] = None
    #: `lava train --method <name>`: the method is offered when ``cli_help`` is set; ``cli_options`` are
    #: its own options (name -> (default, type, help)); ``cli_notes`` add to the help of shared options
    #: (e.g. ``{"rank": "the largest rank"}``); ``cli_default_lr`` is its default learning rate;
    #: ``cli_prepare`` names a ``"module:function"`` ``fn(config, opts, task) -> config`` that finishes
    #: a config built by :meth:`from_cli` with the model and data (masks, a training phase)
    cli_help: ClassVar[str | None] = None
    cli_options: ClassVar[dict[str, tuple]] = {}
    cli_notes: ClassVar[dict[str, str]] = {}
    cli_default_lr: ClassVar[float] = 1e-3
    cli_prepare: ClassVar[str | None] = None

    @classmethod
    def from_cli(cls, opts: dict[str, Any], common: dict[str, Any]) -> "AdapterConfig":
        """The config `lava train` builds from its options; ``common`` holds ``r``, ``alpha``,
        ``target_modules`` and ``modules_to_save``."""
        return cls(**common)

    target_modules: Any = None
    exclude_modules: Any = None
    modules_to_save: list[str] | None = None
    r: int = 8
    alpha: float = 16.0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self) -> None:
        self.target_modules = normalize_targets(self.target_modules)
        self.exclude_modules = normalize_targets(self.exclude_modules)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.validate()

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise :class:`LavaConfigError` naming the field to fix."""
        if self.target_modules is None or self.target_modules == []:
            raise LavaConfigError(
                f"{type(self).__name__}: target_modules is empty; name the layers to adapt, "
                'e.g. target_modules=["query", "value"], "all-linear", or [torch.nn.Conv2d]'
            )
        if isinstance(self.target_modules, str) and self.target_modules not in _KEYWORDS:
            _check_regex("target_modules", self.target_modules)
        if isinstance(self.exclude_modules, str):
            _check_regex("exclude_modules", self.exclude_modules)
        _check_rank("r", self.r)
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        if not (0.0 <= self.dropout < 1.0):
            raise LavaConfigError(f"dropout must be in [0, 1); got {self.dropout}")

    # ---------------------------------------------------------------- per module
    def rank_for(self, module_name: str) -> int:
        return _pattern_lookup(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_lookup(self.alpha_pattern, module_name, self.alpha)

    def scale_for(self, module_name: str) -> float:
        r = self.rank_for(module_name)
        a = self.alpha_for(module_name)
        return a / (r**0.5) if self.use_rslora else a / r

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LavaConfigError(
                f"{cls.__name__} has no field(s) {unknown}; valid fields are {sorted(known)}"
            )
        return cls(**data)

    def regularization_weight(self) -> float:
        """Weight of the adapters' regularization term in the loss (0: none)."""
        return 0.0

    def replace(self, **changes: Any) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)


_KEYWORDS = ("all-linear", "all-conv", "all")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise LavaConfigError(f"{name}={pattern!r} is not a valid regular expression: {exc}") from None


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LavaConfigError(f"{name} must be a positive integer; got {value!r}")


def _pattern_lookup(pattern: dict, module_name: str, default: Any) -> Any:
    """Per-module override: exact name, then name suffix, then regex full match."""
    for key, value in pattern.items():
        if module_name == key or module_name.endswith("." + key):
            return value
    for key, value in pattern.items():
        try:
            if re.fullmatch(key, module_name):
                return value
        except re.error:
            continue
    return default


def config_from_payload(payload: dict, source: str) -> AdapterConfig:
    """The config stored in an ``adapter_config.json`` payload, with the format checks a loader needs."""
    if not isinstance(payload, dict) or "method" not in payload or "config" not in payload:
        raise AdapterFileError(
            f"{source} is not a lava-peft adapter config (no 'method'/'config' keys). "
            "For a Hugging Face PEFT directory use lava_peft.import_peft(base, dir)."
        )
    version = payload.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{source} uses adapter format version {version}, newer than this lava-peft "
            f"supports ({FORMAT_VERSION}); upgrade with `pip install -U lava-peft`"
        )
    cls = config_class(payload["method"])
    if not isinstance(payload["config"], dict):
        raise AdapterFileError(f"{source}: 'config' must be a JSON object; the file is corrupt")
    try:
        return cls.from_dict(payload["config"])
    except (LavaConfigError, TypeError) as exc:
        raise AdapterFileError(f"{source}: {exc}") from None
