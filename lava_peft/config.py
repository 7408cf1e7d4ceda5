"""Adapter configs: one dataclass base, JSON round trip, validation and the method registry.

Every method subclasses :class:`AdapterConfig` and registers itself with
:func:`register_method`, naming its config class and its adapter class.  The rest of
the library (injection, save/load, the CLI) only ever looks methods up here.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

try:  # the parser behind ``re`` (3.11+ name, then the 3.10 one)
    import re._parser as _regex_parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _regex_parser

from .errors import AdapterFileError, AdapterNameError, LavaConfigError

FORMAT_VERSION = 3
"""Version of the on-disk adapter format (``adapter_config.json`` / safetensors layout).  2: adapters PEFT can
represent are written in HF PEFT's key layout with PEFT's config fields (``layout: "peft"``); the
PEFT-named config fields (task_type, ...) exist; pattern keys follow PEFT's first-match rule.  3: SHiRA
adapters PEFT computes identically are written in PEFT's SHiRA layout (``layout: "peft-shira"``); LoRA/LAVA
``init`` may be ``"pissa"``/``"olora"`` (the folder is loaded onto the original base)."""

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

    A layer type (e.g. ``nn.Conv2d``) in a list becomes the string ``"type:Conv2d"``; a set (as
    PEFT stores it) becomes a sorted list.
    """
    if targets is None or isinstance(targets, str):
        return targets
    if isinstance(targets, type):
        targets = [targets]
    if isinstance(targets, (set, frozenset)):
        targets = sorted(targets, key=lambda t: t.__name__ if isinstance(t, type) else str(t))
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



class TaskType(str, enum.Enum):
    """HF PEFT's task types (``task_type=``). ``SEQ_CLS`` / ``TOKEN_CLS`` / ``QUESTION_ANS`` add the task's
    head (``classifier``/``score``; ``qa_outputs``) to ``modules_to_save``; the others only label the adapter."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
"""Head modules each task type trains and saves (PEFT's lists); those present in the model join ``modules_to_save``."""

# ---- HF PEFT's config names, accepted as aliases (ours stay canonical: ``to_dict`` writes ours) ----------------
PEFT_RENAMED_FIELDS: dict[str, str] = {"lora_alpha": "alpha", "lora_dropout": "dropout"}
"""PEFT field -> our field of the same meaning and value."""
PEFT_CHECKED_FIELDS: dict[str, tuple[tuple, str]] = {
    "bias": (("none",), "only bias='none' exists here: the base biases stay frozen and no adapter bias is "
                        "trained; train a bias with modules_to_save=[<its module>] instead"),
    "fan_in_fan_out": ((True, False), "the weight layout is always read from the layer (GPT-2 Conv1D is "
                                      "handled), so the value only has to be True or False"),
}
"""PEFT fields accepted for compatibility and not stored: ``(accepted values, why)``."""
PEFT_INIT_FIELD = "init_lora_weights"
"""PEFT's ``init_lora_weights``: ``True`` keeps the method's default init, a string sets ``init`` (e.g.
``"gaussian"``; the method's config decides which it knows), ``False`` is refused (PEFT's debugging init with
a non-zero increment at the start)."""


UNAVAILABLE_PEFT_INITS: dict[str, str] = {
    "eva": "EVA initialises A from an SVD of each layer's inputs over a data loader (peft's "
           "initialize_lora_eva_weights); lava-peft has no data-driven initialisation step. Train with the default "
           "init, or initialise with peft and import the trained adapter (lp.import_peft: an EVA adapter is a plain LoRA)",
    "loftq": "LoftQ alternates quantization of the base weight (bitsandbytes NF4/int8) with an SVD of the "
             "quantization error; it needs bitsandbytes-quantized layers, which lava-peft's adapters do not wrap",
    "corda": "CorDA needs peft's preprocess_corda (covariance of layer inputs over calibration data) before the "
             "adapter is built; lava-peft has no such step. Use init_lora_weights='pissa' (data-free) instead",
    "lora_ga": "LoRA-GA needs gradients collected by peft's preprocess_loraga before the adapter is built",
    "mica": "MiCA freezes lora_B during training, a training rule lava-peft's adapters do not have",
    "orthogonal": "PEFT's 'orthogonal' init starts with a non-zero increment; use LAVA's init='orthogonal' "
                  "(orthonormal U, V = 0) or the default",
}
"""PEFT ``init_lora_weights`` values no config here accepts, with the reason (named in the error); PiSSA and OLoRA
(``"pissa"``, ``"pissa_niter_<K>"``, ``"olora"``) are LoRA/LAVA inits: :mod:`lava_peft.methods.base_init`."""


def resolve_peft_names(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with HF PEFT's field names turned into ours (:data:`PEFT_RENAMED_FIELDS`,
    :data:`PEFT_CHECKED_FIELDS`, :data:`PEFT_INIT_FIELD`); raises :class:`LavaConfigError` for a value
    that has no meaning here, or for both names of one field."""
    out = dict(kwargs)
    own = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for peft_name, ours in PEFT_RENAMED_FIELDS.items():
        if peft_name in out and peft_name not in own:
            if ours in out:
                raise LavaConfigError(f"{cls.__name__}: pass {ours}= or its PEFT name {peft_name}=, not both")
            out[ours] = out.pop(peft_name)
    for peft_name, (accepted, why) in PEFT_CHECKED_FIELDS.items():
        if peft_name in out and peft_name not in own:  # a method's own field of that name (bottleneck bias) wins
            value = out.pop(peft_name)
            value = getattr(value, "value", value)  # enum members (PeftType.LORA)
            if value not in accepted or isinstance(value, bool) != isinstance(accepted[0], bool):
                raise LavaConfigError(f"{cls.__name__}: {peft_name}={value!r} is not supported; {why}")
    if PEFT_INIT_FIELD in out:
        init = out.pop(PEFT_INIT_FIELD)
        if init is False:
            raise LavaConfigError(
                f"{cls.__name__}: init_lora_weights=False (PEFT's random init with a non-zero increment, meant for "
                "debugging) is not supported; use True (the default) or 'gaussian'"
            )
        if isinstance(init, str):
            if init.lower() in UNAVAILABLE_PEFT_INITS:
                raise LavaConfigError(f"{cls.__name__}: init_lora_weights={init!r} is not available: "
                                      f"{UNAVAILABLE_PEFT_INITS[init.lower()]}")
            if "init" not in {f.name for f in dataclasses.fields(cls)} or "init" in out:
                raise LavaConfigError(f"{cls.__name__}: init_lora_weights={init!r} is not supported by this method")
            out["init"] = init
        elif init is not True:
            raise LavaConfigError(f"{cls.__name__}: init_lora_weights must be True or a string; got {init!r}")
    return out


class _AcceptsPeftNames(type):
    """Metaclass of :class:`AdapterConfig`: the constructor accepts PEFT's field names (:func:`resolve_peft_names`)."""

    def __call__(cls, *args, **kwargs):
        renamed = resolve_peft_names(cls, kwargs)
        if "init" in renamed and "init" not in kwargs:
            try:
                return super().__call__(*args, **renamed)
            except LavaConfigError as exc:
                raise LavaConfigError(f"init_lora_weights={renamed['init']!r}: {exc}") from None
        return super().__call__(*args, **renamed)


@dataclass
class AdapterConfig(metaclass=_AcceptsPeftNames):
    r"""Fields shared by every method.

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
        rank_pattern / alpha_pattern: per-module overrides, HF PEFT's rule: the first key ``k`` (in
            order) for which ``re.match(rf"(.*\.)?({k})$", module_name)`` holds — a name, a name
            suffix (``"query"``, ``"layer.0.attention.self.query"``) or a regex matching the end
            of the name after a dot (``r"layers\.0\..*"``, ``"k_proj|o_proj"``).
        dropout: dropout on the adapter's input (unmerged path only).
        use_rslora: use ``alpha / sqrt(r)`` as the scale.
        task_type: PEFT's task (:class:`TaskType`); ``SEQ_CLS``/``TOKEN_CLS`` train and save the
            classification head (``classifier``/``score``; ``QUESTION_ANS``: ``qa_outputs``).
        inference_mode: the adapter is built frozen (not trainable).
        base_model_name_or_path: the base model's name or path (filled from ``model.name_or_path``);
            ``lp.AutoPeftModel*`` loads it.
        layers_to_transform / layers_pattern: adapt only these layer indices (PEFT's rule: the index is
            the number after ``<layers_pattern>.`` in the module name, or after the second name
            component); only with a list ``target_modules``.

    HF PEFT's names are accepted as aliases: ``lora_alpha`` (``alpha``), ``lora_dropout``
    (``dropout``), ``init_lora_weights`` (``init``), ``bias="none"``, ``fan_in_fan_out`` (read from the
    layer anyway) — see :data:`PEFT_RENAMED_FIELDS`; ``config.lora_alpha`` reads ``alpha``.
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
    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None

    def __post_init__(self) -> None:
        self.target_modules = normalize_targets(self.target_modules)
        self.exclude_modules = normalize_targets(self.exclude_modules)
        if isinstance(self.modules_to_save, (str, set, tuple)):
            self.modules_to_save = [self.modules_to_save] if isinstance(self.modules_to_save, str) else sorted(
                self.modules_to_save)
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        self.validate()

    # PEFT's attribute names, read and written through to ours
    lora_alpha = property(lambda self: self.alpha, lambda self, v: setattr(self, "alpha", v))
    lora_dropout = property(lambda self: self.dropout, lambda self, v: setattr(self, "dropout", v))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "AdapterConfig":
        """The config stored in an adapter directory, ours or a HF PEFT LoRA one (PEFT's
        ``LoraConfig.from_pretrained``; :func:`lava_peft.peft_api.config_from_pretrained`)."""
        return method_hook("lava_peft.peft_api:config_from_pretrained")(cls, pretrained_model_name_or_path, **kwargs)

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise :class:`LavaConfigError` naming the field to fix.

        ``target_modules=None`` is valid: the model's architecture then picks the defaults
        (:func:`lava_peft.targets.default_target_modules`); an empty list is not."""
        if self.target_modules == []:
            raise LavaConfigError(
                f"{type(self).__name__}: target_modules is empty; name the layers to adapt, "
                'e.g. target_modules=["query", "value"], "all-linear", or [torch.nn.Conv2d] (or leave it None '
                "for the architecture's defaults)"
            )
        self._validate_peft_fields()
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

    def _validate_peft_fields(self) -> None:
        if self.task_type is not None and self.task_type not in TaskType._value2member_map_:
            raise LavaConfigError(f"task_type must be one of {[t.value for t in TaskType]} or None; got {self.task_type!r}")
        if not isinstance(self.inference_mode, bool):
            raise LavaConfigError(f"inference_mode must be True or False; got {self.inference_mode!r}")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise LavaConfigError(f"base_model_name_or_path must be a string; got {self.base_model_name_or_path!r}")
        layers = self.layers_to_transform
        if layers is not None:
            values = [layers] if isinstance(layers, int) else layers
            if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
                raise LavaConfigError(f"layers_to_transform must be a layer index or a list of them; got {layers!r}")
        patterns = self.layers_pattern
        if patterns is not None:
            values = [patterns] if isinstance(patterns, str) else patterns
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise LavaConfigError(f"layers_pattern must be a name (e.g. 'layers') or a list of names; got {patterns!r}")
            for v in values:
                _check_regex("layers_pattern", rf"(?:^|.*?\.){v}\.(?P<idx>\d+)\.")
        if isinstance(self.target_modules, str) and (layers is not None or patterns is not None):
            raise LavaConfigError(
                "layers_to_transform/layers_pattern need target_modules as a list of names (as in PEFT); with a regex "
                "string, put the layer indices in the regex"
            )
        if patterns and layers is None:
            raise LavaConfigError("layers_pattern needs layers_to_transform (the indices to adapt), as in PEFT")

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
        known = {f.name for f in dataclasses.fields(cls)} | set(PEFT_RENAMED_FIELDS) | set(PEFT_CHECKED_FIELDS)
        known.add(PEFT_INIT_FIELD)
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


@functools.lru_cache(maxsize=512)
def pattern_key_regex(key: str) -> re.Pattern:
    r"""HF PEFT's reading of a ``rank_pattern``/``alpha_pattern`` key: ``(.*\.)?(key)$`` from the name's
    start (``re.match``); the key itself is checked for backtracking risks like every module-name regex."""
    _check_regex("pattern key", key)
    return re.compile(rf"(.*\.)?({key})$")


def _pattern_lookup(pattern: dict, module_name: str, default: Any) -> Any:
    """Per-module override, HF PEFT's rule (``peft.utils.other.get_pattern_key``): the value of the first
    key, in order, that names the module — equal to it, a ``.``-suffix of it, or PEFT's regex
    :func:`pattern_key_regex` matches it."""
    for key, value in pattern.items():
        if module_name == key or module_name.endswith("." + key) or pattern_key_regex(key).match(module_name):
            return value
    return default
