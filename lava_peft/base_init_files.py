"""Adapters initialised from the base weight (PiSSA, OLoRA) at the model level: the residual base, what a saved
folder records, and conversion into a plain LoRA on the original base.

The maths is :mod:`lava_peft.methods.base_init`'s.  At ``commit`` the base weight ``W`` becomes the residual
``W_res = W − s·B₀A₀`` (:func:`apply_base_change`).  A saved folder (``init="pissa"``/``"olora"`` in the config,
PEFT's ``init_lora_weights`` beside it) therefore holds the *trained* factors ``B, A`` and is loaded, as in PEFT,
onto the **original** base: loading re-derives ``B₀, A₀`` and the residual from it, then sets ``B, A``.  The
fingerprint records the digests of the original weights (:func:`note_base_init`), and loading checks them
always (not only with ``strict_base``): a residual or other base gives a clear error instead of silently
subtracting ``s·B₀A₀`` a second time.

Conversion (PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``; ours:
``convert_pissa_to_lora=True``): ``W_res + s·BA = W + s(BA − B₀A₀)``, so the rank-``2r`` LoRA with
``B' = [B | −B₀]``, ``A' = [A ; A₀]`` and scale ``s`` (``r' = 2r``, ``α' = 2α``, or ``√2·α`` with rsLoRA) gives
the trained model's outputs on the original base and needs no residual.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from .adapter_files import read_adapter_dir
from .config import AdapterConfig
from .errors import AdapterFileError, IncompatibleBaseModelError, LavaError
from .fingerprint import weight_digest
from .layers import AdaptedLayer
from .methods.base_init import base_init_kind, reproducible_on_load, residual_weight
from .peft_common import LORA_KEY, PREFIX, lora_factor_role

BASE_WEIGHTS_NOTE = (
    "init {init!r}: the adapter was initialised from the base weights, which it replaced by the residual "
    "W - s*B0*A0. Load this folder onto the ORIGINAL base model (loading re-derives B0, A0 and the residual from "
    "it, as PEFT does); never onto the residual. save_pretrained(..., convert_pissa_to_lora=True) writes a plain "
    "LoRA for the original base instead."
)
"""The payload's ``base_weights`` entry of an unconverted PiSSA / OLoRA folder."""


def note_base_init(adapter, found, base, path: str) -> None:
    """In ``plan``: refuse a layer holding merged adapters (its weight is not the base weight), and keep the
    digest of the original base weight on the adapter (the fingerprint records it, not the residual's)."""
    if isinstance(found, AdaptedLayer) and found.merged_adapters:
        raise LavaError(f"init={adapter.base_init!r} reads the base weight of {path}, which holds merged adapters "
                        f"{found.merged_adapters}; unmerge them first (model.unmerge_adapter())")
    adapter.original_base_digest = weight_digest(base.weight)


@torch.no_grad()
def apply_base_change(layer, adapter) -> None:
    """In ``commit``: replace the layer's base weight by ``W − s·B₀A₀`` (once; nothing for other adapters)."""
    take = getattr(adapter, "take_base_change", None)  # weight adapters only (module adapters have no base weight)
    change = take() if take is not None else None
    if change is None:
        return
    up, down, scale = change
    weight = layer.base_layer.weight
    canonical = layer.ops.to_base_layout(weight)  # a transpose or the identity: its own inverse
    weight.copy_(layer.ops.to_base_layout(residual_weight(canonical, up.to(weight.device), down.to(weight.device),
                                                          scale)))


def base_init_warnings(name: str, config: AdapterConfig, existing: dict[str, AdapterConfig]) -> list[str]:
    """PEFT's warning: an adapter that changed the base weights next to other adapters (each sees the residual)."""
    inits = {n: getattr(c, "init", None) for n, c in existing.items()}
    changing = [n for n, i in inits.items() if base_init_kind(i)]
    if base_init_kind(getattr(config, "init", None)) and existing:
        changing.append(name)
    if not changing or not existing:
        return []
    return [f"adapter(s) {changing} replaced base weights by residuals (PiSSA/OLoRA), and the model holds other "
            f"adapters too: all of them now run on the residual base. Convert such an adapter to a plain LoRA "
            "(save_pretrained(..., convert_pissa_to_lora=True)) to combine it with others"]


def warn_residual_left(configs: dict[str, AdapterConfig], removed: list[str]) -> None:
    """Warn when adapters that turned base weights into residuals go away unmerged: the base model left behind
    is the residual, not the original (PEFT leaves it so silently)."""
    left = [n for n in removed if base_init_kind(getattr(configs.get(n), "init", None))]
    if left:
        warnings.warn(f"adapter(s) {left} replaced base weights by the residual W - s*B0*A0 (PiSSA/OLoRA); removed "
                      "unmerged, they leave the residual in the model, whose outputs are not the original base model's. "
                      "merge_and_unload() keeps the trained weights; reload the base model for the original ones",
                      UserWarning, stacklevel=3)


def check_loadable(config: AdapterConfig, source: str) -> bool:
    """Whether a saved config re-derives its factors from the base on load; refuses one that cannot."""
    init = getattr(config, "init", None)
    if not base_init_kind(init):
        return False
    if not reproducible_on_load(init):
        raise AdapterFileError(
            f"{source} is an unconverted {init!r} adapter: its randomized SVD cannot be recomputed identically on "
            "load, so the residual base would differ from the one it was trained on. Save it converted to a plain "
            "LoRA (save_pretrained(..., convert_pissa_to_lora=True) or path_initial_model_for_weight_conversion=...), "
            "or train with init_lora_weights='pissa' (the exact SVD)")
    return True


def check_original_base(model, fingerprint: dict, config: AdapterConfig, source: str) -> None:
    """Refuse a base whose targeted weights are not the original ones an unconverted PiSSA / OLoRA adapter was
    initialised from (sha256 of their bytes, recorded at initialisation), before anything changes.  A weight in
    another dtype cannot be compared byte for byte: a warning says the re-derived residual then differs by rounding."""
    recorded = fingerprint.get("weights") if isinstance(fingerprint, dict) else None
    problems, other_dtype = [], []
    for path in (fingerprint or {}).get("modules", {}):
        found = model.get_submodule(path)
        weight = (found.base_weight if isinstance(found, AdaptedLayer) and not found.merged_adapters
                  else getattr(found, "base_layer", found).weight)
        saved = (recorded or {}).get(path)
        here = weight_digest(weight)
        if not isinstance(saved, dict) or here is None:
            problems.append(f"{path}: no recorded hash of its original weight to compare with")
        elif here["dtype"] != saved.get("dtype"):
            other_dtype.append(f"{path} ({here['dtype']} here, {saved.get('dtype')} at initialisation)")
        elif here["sha256"] != saved.get("sha256"):
            problems.append(f"{path}: its weight's bytes differ")
    if problems:
        raise IncompatibleBaseModelError(
            f"{source} holds an unconverted init={config.init!r} adapter, which re-derives its residual from the "
            f"ORIGINAL base weights; this base differs from them: {'; '.join(problems[:5])}. If this model is the "
            "residual one (e.g. the model it was trained on, whose weights it already changed), load onto a fresh "
            "copy of the original base; or convert the adapter to a plain LoRA when saving "
            "(save_pretrained(..., convert_pissa_to_lora=True))")
    if other_dtype:
        warnings.warn(f"{source}: init={config.init!r} re-derives its residual from base weights in another dtype than "
                      f"at initialisation ({'; '.join(other_dtype[:3])}): the outputs differ from the trained model's "
                      "by that rounding. Load the base in the training dtype for exact outputs", UserWarning,
                      stacklevel=3)


def saved_base_note(config: AdapterConfig) -> dict:
    """The payload entries of an unconverted PiSSA / OLoRA adapter (none for other adapters)."""
    init = getattr(config, "init", None)
    return {"base_weights": BASE_WEIGHTS_NOTE.format(init=init)} if base_init_kind(init) else {}


def warn_unreloadable(config: AdapterConfig, directory) -> None:
    init = getattr(config, "init", None)
    if base_init_kind(init) and not reproducible_on_load(init):
        warnings.warn(f"{directory}: an unconverted {init!r} adapter cannot be loaded back exactly (its randomized "
                      "SVD is not reproducible); pass convert_pissa_to_lora=True to save a plain LoRA", UserWarning,
                      stacklevel=3)


# ---------------------------------------------------------------------------------------------- conversion
def initial_factors_from_model(layers: list[tuple[str, object]], adapter_name: str) -> dict:
    """``{path: (B₀, A₀)}`` kept by the adapters since they were built."""
    out = {}
    for path, adapter in layers:
        initial = adapter.initial_factors()
        if initial is None:
            raise LavaError(f"adapter {adapter_name!r} at {path} was not initialised from the base weights (PiSSA / "
                            "OLoRA), so there is nothing to convert; save it as it is")
        out[path] = initial
    return out


def initial_factors_from_dir(directory, layers: list[tuple[str, object]]) -> dict:
    """``{path: (B₀, A₀)}`` from the folder saved right after initialisation (ours or PEFT's), checked against
    the adapter's layers and shapes."""
    files = read_adapter_dir(Path(directory), parse_config=False, load_tensors=False)
    tensors = files.read_tensors()
    ours = "method" in files.payload and files.payload.get("layout") != "peft"
    found: dict[str, dict[str, torch.Tensor]] = {}
    by_path = dict(layers)
    for key, value in tensors.items():
        if ours:
            path, _, name = key.rpartition(".")
            if path in by_path:
                found.setdefault(path, {})[name] = value
            continue
        match = LORA_KEY.fullmatch(key[len(PREFIX):]) if key.startswith(PREFIX) else None
        if match:
            found.setdefault(match.group(1), {})[lora_factor_role(match.group(2))] = value
    out = {}
    for path, adapter in layers:
        up_param, down_param = adapter.matrix_factors()
        names = {id(t): k for k, t in adapter.state_dict(keep_vars=True).items()}
        pair = found.get(path, {})
        up = pair.get("up", pair.get(names.get(id(up_param))))
        down = pair.get("down", pair.get(names.get(id(down_param))))
        if up is None or down is None or up.shape != up_param.shape or down.numel() != down_param.numel():
            raise AdapterFileError(
                f"{directory} does not hold the initial factors of {path} with the adapter's shapes "
                f"{tuple(up_param.shape)} / {tuple(down_param.shape)}; pass the folder saved right after "
                "initialisation (before training) of this adapter")
        out[path] = (up.float(), down.reshape(down_param.shape).float())
    return out


def converted_state(layers: list[tuple[str, object]], state: dict[str, torch.Tensor], initial: dict) -> dict:
    """``state`` (keys ``<path>.<tensor>``) with each layer's factors replaced by ``[B | −B₀]`` and ``[A ; A₀]``."""
    out = dict(state)
    for path, adapter in layers:
        up_param, down_param = adapter.matrix_factors()
        names = {id(t): k for k, t in adapter.state_dict(keep_vars=True).items()}
        up_key, down_key = f"{path}.{names[id(up_param)]}", f"{path}.{names[id(down_param)]}"
        up0, down0 = initial[path]
        out[up_key] = torch.cat([state[up_key].float(), -up0.to(state[up_key].device)], dim=1)
        out[down_key] = torch.cat([state[down_key].float(), down0.to(state[down_key].device)], dim=0)
    return out


def converted_config(config: AdapterConfig) -> AdapterConfig:
    """The config of the converted adapter: rank ``2r`` everywhere, the same scale, the method's default init."""
    factor = math.sqrt(2) if config.use_rslora else 2.0
    default_init = type(config).__dataclass_fields__["init"].default
    return config.replace(init=default_init, r=2 * config.r, alpha=config.alpha * factor,
                          rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                          alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()})


def converted_peft_fields(fields: dict, use_rslora: bool) -> dict:
    """PEFT's config fields of the converted adapter (every rank doubled, alphas to keep each scale)."""
    factor = math.sqrt(2) if use_rslora else 2.0
    return {**fields, "r": 2 * fields["r"], "lora_alpha": fields["lora_alpha"] * factor,
            "rank_pattern": {k: 2 * v for k, v in fields["rank_pattern"].items()},
            "alpha_pattern": {k: v * factor for k, v in fields["alpha_pattern"].items()},
            "init_lora_weights": True}


__all__ = ["apply_base_change", "base_init_warnings", "check_loadable", "converted_config", "converted_peft_fields",
           "check_original_base", "converted_state", "initial_factors_from_dir", "initial_factors_from_model",
           "note_base_init", "saved_base_note", "warn_residual_left", "warn_unreloadable"]
