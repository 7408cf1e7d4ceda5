"""Reading a stored config: ``adapter_config.json``'s payload -> :class:`~lava_peft.config.AdapterConfig`.

The format checks a loader needs (format version, method, every field present with its declared
type, the fingerprint's digest) and the explicit defaults of fields that older format versions lack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from typing import Any

from .config import FORMAT_VERSION, AdapterConfig, _is_real, _pattern_lookup, compile_module_pattern, config_class
from .errors import AdapterFileError, LavaConfigError


def _format1_pattern_lookup(pattern: dict, module_name: str, default: Any) -> Any:
    """The rule format-1 files were written with: exact name, then name suffix (any key), then regex full match."""
    for key, value in pattern.items():
        if module_name == key or module_name.endswith("." + key):
            return value
    for key, value in pattern.items():
        if compile_module_pattern("pattern key", key).fullmatch(module_name):  # checked: a file may hold any key
            return value
    return default


def _pin_format1_patterns(data: dict, modules: Any) -> dict:
    """A format-1 config whose rank/alpha patterns give some saved module another value under today's rule
    (PEFT's first-match order, :func:`_pattern_lookup`) gets them rewritten as exact per-module keys, so
    that the file loads with the ranks and scales it was trained with."""
    if not isinstance(modules, dict):
        return data
    for name, default in (("rank_pattern", data.get("r")), ("alpha_pattern", data.get("alpha"))):
        pattern = data.get(name)
        if not isinstance(pattern, dict) or not pattern:
            continue
        try:
            old = {m: _format1_pattern_lookup(pattern, m, default) for m in modules}
            changed = any(_pattern_lookup(pattern, m, default) != v for m, v in old.items())
        except (re.error, LavaConfigError):
            continue  # the config's own validation reports the key
        if changed:
            data = {**data, name: {re.escape(m): v for m, v in old.items() if v != default}}
    return data


_PEFT_FIELD_DEFAULTS = {"task_type": None, "inference_mode": False, "base_model_name_or_path": None,
                        "layers_to_transform": None, "layers_pattern": None}
FORMAT_DEFAULTS: dict[int, dict[str, dict[str, Any]]] = {
    1: {"*": {**_PEFT_FIELD_DEFAULTS, "use_dora": False},
        "lava": {"conv_path": "auto", "factorization": "cp"},
        "lora": {"conv_path": "auto"},  # format-1 LoRA convs ran the weight path: same numbers either way
        # MoSA files written before the bottleneck variant: the factor variant, its split of U/B
        "mosa": {"adapter": "factors", "scale": None, "activation": None, "layer_norm": None, "bias": True,
                 "mode": None, "dropout_position": "hidden"},
        "lowbit": {"codebook": "exact"}},
}
"""Explicit defaults, per format version and method (``"*"``: every method), for config fields that
files of that version may lack (fields added after the version was first written).  Any other missing
field is an error: a file never silently gets today's dataclass default."""


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
    by_method = FORMAT_DEFAULTS.get(version, {})
    defaults = {**by_method.get("*", {}), **by_method.get(cls.method, {})}
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
    if version == 1:
        data = _pin_format1_patterns(data, (payload.get("base_model_fingerprint") or {}).get("modules"))
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
