"""Adapter configs: one dataclass base, JSON round trip, validation and the method registry.

Every method subclasses :class:`AdapterConfig` and registers itself with
:func:`register_method`, naming its config class and its adapter class.  The rest of
the library (injection, save/load, the CLI) only ever looks methods up here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

try:  # the parser behind ``re`` (3.11+ name, then the 3.10 one)
    import re._parser as _regex_parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _regex_parser

from .errors import AdapterFileError, AdapterNameError, LavaConfigError

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
        for pattern_field in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, pattern_field)
            if not isinstance(value, dict):
                raise LavaConfigError(f"{pattern_field} must be a dict of module name/regex -> value; got {value!r}")
            for key in value:
                _check_regex(f"{pattern_field} key", key)
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        _check_alpha(f"{type(self).__name__}.alpha", self.alpha)
        for key, value in self.alpha_pattern.items():
            _check_alpha(f"{type(self).__name__}.alpha_pattern[{key!r}]", value)
        if not isinstance(self.use_rslora, bool):
            raise LavaConfigError(f"use_rslora must be True or False; got {self.use_rslora!r}")
        if not _is_real(self.dropout) or not (0.0 <= self.dropout < 1.0):
            raise LavaConfigError(f"dropout must be in [0, 1); got {self.dropout!r}")

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

    def adapter_type(self) -> type:
        """The adapter class this config builds: the registered one, unless a config chooses between
        kinds (e.g. MoSA on a bottleneck adapter or on LoRA/LAVA factors) and overrides this."""
        return adapter_class(self.method)

    def replace(self, **changes: Any) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)


_KEYWORDS = ("all-linear", "all-conv", "all")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


MAX_PATTERN_LENGTH = 100_000
"""Longest regex accepted in ``target_modules``/``exclude_modules``/pattern keys (a combination's
``target_modules`` names every adapted module)."""
MAX_UNBOUNDED_REPEATS = 4
"""At most this many ``*``/``+``/``{n,}`` per regex: ``k`` of them cost up to O(len(name)^k) per name."""
_REPEATS = {getattr(_regex_parser, op) for op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
            if hasattr(_regex_parser, op)}


def _check_regex(name: str, pattern: str) -> None:
    """Refuse a regex that is invalid, over-long, or can backtrack for ever (raises LavaConfigError).

    Python's ``re`` backtracks: a quantifier inside a repeated group (``(.+)+``, ``(a*)*``), an
    alternation inside one (``(a|a)*``) or a backreference can take exponential time on a
    name that almost matches, so they are refused; so are more than
    :data:`MAX_UNBOUNDED_REPEATS` unbounded quantifiers.  Patterns come from users and from
    adapter files alike: a file must not be able to hang the loader.
    """
    if not isinstance(pattern, str):
        raise LavaConfigError(f"{name} must be a string (a module name or a regex); got {pattern!r}")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise LavaConfigError(
            f"{name} is a regex of {len(pattern)} characters (limit {MAX_PATTERN_LENGTH}); list the module names instead"
        )
    try:
        parsed = _regex_parser.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise LavaConfigError(f"{name}={pattern!r} is not a valid regular expression: {exc}") from None
    counts = {"unbounded": 0}
    problem = _backtracking_risk(parsed, inside_repeat=False, counts=counts)
    if problem is None and counts["unbounded"] > MAX_UNBOUNDED_REPEATS:
        problem = f"{counts['unbounded']} unbounded quantifiers (limit {MAX_UNBOUNDED_REPEATS})"
    if problem:
        raise LavaConfigError(
            f"{name}={_shorten(pattern)} is refused: it has {problem}, which can make matching a module name take "
            "exponential time (the program would hang). Write it without a quantifier or '|' inside a repeated "
            "group, e.g. '.*\\.(query|value)' instead of '(.*\\.)+(query|value)', or list the module names"
        )


def _shorten(pattern: str, limit: int = 80) -> str:
    return repr(pattern) if len(pattern) <= limit else repr(pattern[:limit]) + "..."


def _backtracking_risk(items, inside_repeat: bool, counts: dict) -> str | None:
    """Walk a parsed regex; describe the first construct that can backtrack exponentially."""
    p = _regex_parser
    for op, av in items:
        if op in _REPEATS:
            low, high, sub = av
            repeats = high > 1
            if repeats and inside_repeat:
                return "a quantifier inside a repeated group (like '(.+)+' or '(a*)*')"
            if high == p.MAXREPEAT:
                counts["unbounded"] += 1
            found = _backtracking_risk(sub, inside_repeat or repeats, counts)
        elif op is p.BRANCH:
            if inside_repeat:
                return "an alternation '|' inside a repeated group (like '(a|a)*')"
            found = None
            for branch in av[1]:
                found = found or _backtracking_risk(branch, inside_repeat, counts)
        elif op is p.SUBPATTERN:
            found = _backtracking_risk(av[-1], inside_repeat, counts)
        elif op in (p.ASSERT, p.ASSERT_NOT):
            found = _backtracking_risk(av[1], inside_repeat, counts)
        elif op is getattr(p, "ATOMIC_GROUP", None):
            found = _backtracking_risk(av, inside_repeat, counts)
        elif op in (p.GROUPREF, p.GROUPREF_EXISTS, getattr(p, "GROUPREF_IGNORE", None)):
            return "a backreference"
        else:
            found = None
        if found:
            return found
    return None


@functools.lru_cache(maxsize=512)
def compile_module_pattern(name: str, pattern: str) -> re.Pattern:
    """``re.compile(pattern)`` after :func:`_check_regex` (cached): the one way module-name regexes
    (``target_modules``, ``exclude_modules``, pattern keys) are compiled."""
    _check_regex(name, pattern)
    return re.compile(pattern)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_alpha(name: str, value: Any) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise LavaConfigError(f"{name} must be a finite number > 0 (the scale is alpha / r); got {value!r}")


ADAPTER_NAME_MAX_LENGTH = 64
_ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9_\-]+")


def check_adapter_name(name: Any, reserved: tuple[str, ...] = ()) -> str:
    """Refuse a name that is not 1..64 letters, digits, '_' or '-' (whole string), or is reserved.

    Call it before anything is written: names become folder names in ``save_pretrained``.
    """
    if (not isinstance(name, str) or len(name) > ADAPTER_NAME_MAX_LENGTH or not _ADAPTER_NAME_RE.fullmatch(name)
            or name in reserved):
        shown = _shorten(name, 40) if isinstance(name, str) else repr(name)
        raise AdapterNameError(
            f"invalid adapter name {shown}: use 1 to {ADAPTER_NAME_MAX_LENGTH} letters, digits, '_' or '-'"
            + (f" (and not {', '.join(map(repr, reserved))})" if reserved else "")
        )
    return name


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
            if compile_module_pattern("pattern key", key).fullmatch(module_name):
                return value
        except LavaConfigError:
            continue  # validate() refuses these; a key that is only a name is not a regex
    return default


FORMAT_DEFAULTS: dict[int, dict[str, dict[str, Any]]] = {
    1: {"lava": {"conv_path": "auto", "factorization": "cp", "use_dora": False},
        "lora": {"conv_path": "auto", "use_dora": False},  # format-1 LoRA convs: the weight path (same numbers)
        # MoSA files written before the bottleneck variant: the factor variant, its split of U/B
        "mosa": {"adapter": "factors", "scale": None, "activation": None, "layer_norm": None, "bias": True,
                 "mode": None, "dropout_position": "hidden"},
        "lowbit": {"codebook": "exact"}},
}
"""Explicit defaults, per format version and method, for config fields that files of that version
may lack (fields added after the version was first written).  Any other missing field is an error:
a file never silently gets today's dataclass default."""


def config_from_payload(payload: dict, source: str) -> AdapterConfig:
    """The config stored in an ``adapter_config.json`` payload, with the format checks a loader needs.

    Checks, each with a message naming the field, the file and the fix: ``format_version`` is
    an integer this library reads; ``method`` is registered; every config field is present
    (or has an explicit :data:`FORMAT_DEFAULTS` entry) and has its declared type; then the
    config's own ``validate`` (rank, alpha finite and > 0, safe regexes, ...).
    """
    if not isinstance(payload, dict) or "method" not in payload or "config" not in payload:
        raise AdapterFileError(
            f"{source} is not a lava-peft adapter config (no 'method'/'config' keys). "
            "For a Hugging Face PEFT directory use lava_peft.import_peft(base, dir)."
        )
    version = payload.get("format_version")
    if isinstance(version, str) and version.strip().isdigit():
        raise AdapterFileError(
            f"{source}: format_version is the string {version!r}; it must be the integer {int(version)} "
            f"(write \"format_version\": {int(version)} without quotes)"
        )
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise AdapterFileError(
            f"{source}: format_version must be a positive integer (this lava-peft writes {FORMAT_VERSION}); "
            f"got {version!r}. The file is corrupt or was not written by lava-peft"
        )
    if version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{source} uses adapter format version {version}, newer than this lava-peft "
            f"supports ({FORMAT_VERSION}); upgrade with `pip install -U lava-peft`"
        )
    if not isinstance(payload["method"], str):
        raise AdapterFileError(f"{source}: 'method' must be a method name string; got {payload['method']!r}")
    cls = config_class(payload["method"])
    if not isinstance(payload["config"], dict):
        raise AdapterFileError(f"{source}: 'config' must be a JSON object; the file is corrupt")
    data = dict(payload["config"])
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise AdapterFileError(f"{source}: {cls.__name__} has no field(s) {unknown}; valid fields are {sorted(known)}")
    defaults = FORMAT_DEFAULTS.get(version, {}).get(cls.method, {})
    missing = sorted(known - set(data) - set(defaults))
    if missing:
        raise AdapterFileError(
            f"{source}: config field(s) {missing} missing; lava-peft writes every field of {cls.__name__} "
            f"(format {version}). The file is truncated or was edited: add them back, or save the adapter again"
        )
    data = {**{k: v for k, v in defaults.items() if k in known}, **data}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not _has_type(data[f.name], hints.get(f.name, Any)):
            raise AdapterFileError(
                f"{source}: config field {f.name!r} must be {_type_name(hints.get(f.name, Any))}; got "
                f"{data[f.name]!r} ({type(data[f.name]).__name__}). Fix the value in the file or save the adapter again"
            )
    _check_fingerprint_digest(payload.get("base_model_fingerprint"), source)
    try:
        return cls.from_dict(data)
    except (LavaConfigError, TypeError) as exc:
        raise AdapterFileError(f"{source}: {exc}") from None


def fingerprint_digest(modules: dict) -> str:
    """The fingerprint's ``sha256``: first 16 hex digits of sha256(json(modules, sorted keys))."""
    return hashlib.sha256(json.dumps(modules, sort_keys=True).encode()).hexdigest()[:16]


def _check_fingerprint_digest(fp: Any, source: str) -> None:
    """Refuse a ``base_model_fingerprint`` whose ``sha256`` does not match its ``modules`` (edited by hand)."""
    if isinstance(fp, dict) and isinstance(fp.get("modules"), dict) and "sha256" in fp:
        if fp["sha256"] != fingerprint_digest(fp["modules"]):
            raise AdapterFileError(
                f"{source}: base_model_fingerprint.sha256 does not match its modules; the config was edited or is "
                "corrupt. Save the adapter again (or fix the modules / delete the sha256 entry if you edited it)"
            )


def _has_type(value: Any, hint: Any) -> bool:
    """Does a JSON value have the declared type (int, float, str, bool, list[...], dict[...], X | None, Any)?"""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return _is_real(value)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0] if args else Any) for v in value)
    if origin is dict:
        key_t, value_t = args if args else (Any, Any)
        return isinstance(value, dict) and all(_has_type(k, key_t) and _has_type(v, value_t) for k, v in value.items())
    return True  # a type JSON cannot hold: left to the config's validate()


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return str(hint).replace("typing.", "")
