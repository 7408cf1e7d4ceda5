"""Hot-swap: replace a loaded adapter's weights in place from a saved directory.

``hotswap_adapter(model, dir, "default")`` copies the tensors of the adapter saved in
``dir`` into the existing parameters of adapter ``"default"`` (``Parameter.copy_``): no
module is created or replaced, no tensor changes shape, dtype or device, so a
``torch.compile``d model keeps its compiled graph (parameters are graph inputs; the
Python attributes it specialises on — ranks, scales, active names — do not change).

Two things differ between adapters and would otherwise change shapes or constants:

* **rank** — factored methods (see :class:`lava_peft.combine.FactorCodec`) store a
  sum of rank-1 components; appending zero components leaves ``ΔW`` unchanged.  A new
  adapter of rank ``r' ≤ R`` (the loaded tensors' rank on that layer) is zero-padded to
  ``R``.  To swap in larger ranks later, call
  :func:`prepare_model_for_compiled_hotswap` (``target_rank=R_max``) *before*
  compiling: it pads the current adapter to ``R_max`` (``ΔW`` unchanged).
* **scale** — ``s = alpha/r`` is a Python float baked into the compiled graph.  The
  ratio ``s_new / s_loaded`` is folded into the output factor (``U`` / ``B``), so
  ``s_loaded · (s_new/s_loaded · U_new) V_new = s_new U_new V_new``: the same ``ΔW``
  up to one rounding of ``U``.

Layers the new adapter does not adapt get zero components (``ΔW = 0``); a new adapter
that adapts a layer the loaded one does not cannot be swapped in (use ``load_adapter``).
``modules_to_save`` copies are overwritten in place (with the original module's values
where the new file has none).  Methods without factors must have identical tensor
shapes and scales.  Everything is read and checked before the first tensor is written.

After the swap ``model.peft_config[name]`` is the new file's config with the loaded
adapter's shape fields (``r``, ``alpha``, patterns, ``target_modules``, ``dropout``),
which describe the tensors now in place, so ``save_pretrained`` → ``from_pretrained``
reproduces the swapped model.  Dropout modules are not swapped (hot-swap is for
inference).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from .methods.factors import Factors, _CODECS, method_of, to_native
from .adapter_files import read_adapter_dir, split_saved_key
from .config import adapter_class
from .errors import AdapterFileError, IncompatibleBaseModelError, LavaConfigError, LavaError
from .inject import adapted_layers, saved_module_wrappers
from .io import check_tensors_match
from .layers import AdaptedLayer, layer_ops
from .methods.base import ModuleAdapter
from .methods.base_init import base_init_kind
from .module_layers import module_spec


def load_off_model(model, model_id: str) -> tuple:
    """``(config, {path: adapter module}, tensors)`` for a saved adapter, built off-model and checked."""
    files = read_adapter_dir(model_id, load_tensors=False)
    config, directory = files.config, files.directory
    if base_init_kind(getattr(config, "init", None)):
        raise AdapterFileError(
            f"{directory} holds an unconverted init={config.init!r} adapter, which needs its own residual base "
            "weights; a hot-swap changes adapter tensors only. Save it with convert_pissa_to_lora=True (a plain LoRA "
            "on the original base) and hot-swap that")
    cls = config.adapter_type()
    module_kind = issubclass(cls, ModuleAdapter)  # the second kind: built from the module's spec
    paths = model.check_fingerprint(files.payload.get("base_model_fingerprint"), str(directory),
                                    module_kind=module_kind)
    tensors = files.read_tensors()
    adapters = {}
    for path in paths:
        found = model.model.get_submodule(path)
        base = found.base_layer if isinstance(found, AdaptedLayer) else found
        if module_kind:
            spec = module_spec(base, path)
            cls.check_module(spec, config, path)
            adapters[path] = cls.for_module(spec, config, path)
            continue
        spec = layer_ops(base).spec(base)
        cls.check_layer(spec, config, path)
        adapters[path] = cls.for_layer(spec, config, path)
    expected = {f"{p}.{k}": v for p, a in adapters.items() for k, v in a.state_dict().items()}
    layer_keys = {k for k in tensors if split_saved_key(k) is None}
    check_tensors_match(expected, tensors, files.weights_path, keys=layer_keys)
    with torch.no_grad():
        for p, a in adapters.items():
            a.load_state_dict({k: tensors[f"{p}.{k}"] for k in a.state_dict()})
    return config, adapters, tensors


def hotswap_adapter(model, model_id: str, adapter_name: str = "default") -> None:
    """Replace adapter ``adapter_name``'s weights in place with those saved in ``model_id``.

    Raises (before anything is modified) if the new adapter targets a layer the loaded one
    does not, has a larger rank than the loaded tensors (call
    :func:`prepare_model_for_compiled_hotswap` first), cannot be represented in the loaded
    method's form, or if the adapter is merged.
    """
    model.check_known(adapter_name)
    if adapter_name in model.merged_adapters:
        raise LavaError(f"adapter {adapter_name!r} is merged; call model.unmerge_adapter() before hot-swapping it")
    config, new_adapters, tensors = load_off_model(model, model_id)
    layers = {path: layer for path, layer in adapted_layers(model.model) if adapter_name in layer.adapters}
    extra = sorted(set(new_adapters) - set(layers))
    if extra:
        raise IncompatibleBaseModelError(
            f"the adapter in {model_id} adapts {extra[:5]}, which adapter {adapter_name!r} does not; hot-swap "
            "can only fill the loaded adapter's layers. Load it with model.load_adapter() instead"
        )
    writes = []  # (callable, args) executed after every check passed
    for path, layer in layers.items():
        old = layer.adapters[adapter_name]
        new = new_adapters.get(path)
        writes.append(_plan_layer_write(path, old, new, adapter_name, model_id))
    saved_writes = _plan_saved_writes(model, adapter_name, tensors, model_id)

    with torch.no_grad():
        for fn in writes:
            fn()
        for fn in saved_writes:
            fn()
    old_cfg = model.peft_config[adapter_name]
    if type(config) is type(old_cfg):
        shape_fields = ("target_modules", "exclude_modules", "modules_to_save", "r", "alpha", "rank_pattern",
                        "alpha_pattern", "dropout", "use_rslora")
        model.peft_config[adapter_name] = dataclasses.replace(config, **{f: getattr(old_cfg, f) for f in shape_fields})


def _plan_layer_write(path, old, new, adapter_name, model_id):
    method_old = method_of(old)
    codec = _CODECS.get(method_old)
    if codec is not None:
        codec = codec.for_adapter(old)
        with torch.no_grad():
            current = codec.read(old)
        rank = current.rank
        if new is None:
            incoming = Factors(torch.zeros_like(current.up), [torch.zeros_like(m) for m in current.modes],
                               None if current.core is None else torch.zeros_like(current.core))
        else:
            new_codec = _CODECS.get(method_of(new))
            if new_codec is None:
                raise LavaConfigError(
                    f"{path}: the adapter in {model_id} ({method_of(new)}) has no factors and cannot be swapped into "
                    f"{adapter_name!r} ({method_old}); load it with model.load_adapter()"
                )
            with torch.no_grad():
                incoming = to_native(new_codec.read(new), codec, old.spec)
            if incoming is None:
                raise LavaConfigError(
                    f"{path}: a {method_of(new)} adapter cannot be represented as {method_old} on this conv layer; "
                    "hot-swap adapters of the same method"
                )
            if incoming.rank > rank:
                raise LavaConfigError(
                    f"{path}: the new adapter has rank {incoming.rank} but {adapter_name!r} holds rank {rank}; call "
                    f"lava_peft.prepare_model_for_compiled_hotswap(model, target_rank={incoming.rank}) before "
                    "compiling, then hot-swap"
                )
            incoming = incoming.padded(rank)
        incoming = incoming.detached()
        return lambda: codec.write(old, incoming)
    # a method without factors: identical shapes and scale
    if new is not None and type(new) is not type(old):
        raise LavaConfigError(f"{path}: cannot hot-swap a {method_of(new)} adapter into a {method_old} adapter")
    if new is not None and new.scale != old.scale:
        raise LavaConfigError(
            f"{path}: the new adapter's scale {new.scale} differs from the loaded {old.scale}; {method_old} adapters "
            "can only be hot-swapped at equal alpha/r"
        )
    old_state = old.state_dict()
    new_state = {k: torch.zeros_like(v) for k, v in old_state.items()} if new is None else new.state_dict()
    for k, v in old_state.items():
        if new_state[k].shape != v.shape:
            raise LavaConfigError(f"{path}.{k}: shape {tuple(new_state[k].shape)} differs from the loaded {tuple(v.shape)}")
    return lambda: _load_in_place(old, new_state)


@torch.no_grad()
def _load_in_place(adapter, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict`` copies into the existing tensors (storage kept: no recompilation), and lets
    an adapter whose file tensors derive from its parameters (low-bit codes) restore them itself."""
    adapter.load_state_dict(state)


def _plan_saved_writes(model, adapter_name, tensors, model_id):
    saved_in_file = {}
    for key, value in tensors.items():
        saved = split_saved_key(key)
        if saved is not None:
            module, param = saved
            saved_in_file.setdefault(module, {})[param] = value
    wrappers = dict(saved_module_wrappers(model.model))
    orphan = sorted(m for m in saved_in_file if m not in wrappers or adapter_name not in wrappers[m].copies)
    if orphan:
        raise IncompatibleBaseModelError(
            f"the adapter in {model_id} saves modules {orphan} that adapter {adapter_name!r} has no copy of; "
            "load it with model.load_adapter() instead"
        )
    writes = []
    for path, wrapper in wrappers.items():
        if adapter_name not in wrapper.copies:
            continue
        target = wrapper.copies[adapter_name].state_dict()
        source = saved_in_file.get(path) or wrapper.original_module.state_dict()
        if set(source) != set(target) or any(source[k].shape != target[k].shape for k in target):
            raise AdapterFileError(f"{model_id}: the saved copy of {path} does not match the module's tensors")
        writes.append(lambda t=target, s=source: [t[k].copy_(s[k]) for k in t])
    return writes


def prepare_model_for_compiled_hotswap(model, target_rank: int, adapter_name: str | None = None) -> None:
    """Pad adapter ``adapter_name`` (default: the active one) to rank ``target_rank`` on every layer
    (clipped to each layer's maximal rank), with zero components: ``ΔW`` is unchanged.

    Call it before ``torch.compile`` so that later :func:`hotswap_adapter` calls with ranks up
    to ``target_rank`` keep every tensor shape. The scale becomes 1 (``alpha = r``; the old
    scale is folded into the output factor) and the config's ``rank_pattern`` records the
    padded ranks, so the padded adapter saves and loads like any other.
    """
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank <= 0:
        raise LavaConfigError(f"target_rank must be a positive integer; got {target_rank!r}")
    name = adapter_name or model.active_adapter
    model.check_known(name)
    if name in model.merged_adapters:
        raise LavaError(f"adapter {name!r} is merged; unmerge it before preparing it for hot-swap")
    old_cfg = model.peft_config[name]
    codec = _CODECS.get(old_cfg.method)
    if codec is None:
        return  # no rank: tensor shapes are fixed by the layer already
    layers = [(p, layer) for p, layer in adapted_layers(model.model) if name in layer.adapters]
    ranks = {}
    for path, layer in layers:
        current = layer.adapters[name].r
        limit = codec.for_config(old_cfg).max_rank(layer.spec)
        ranks[path] = max(current, min(target_rank, limit))
    common = max(ranks.values())
    pattern = {f"^{re.escape(p)}$": r for p, r in ranks.items() if r != common}
    new_cfg = dataclasses.replace(
        old_cfg, r=common, alpha=float(common), rank_pattern=dict(pattern),
        alpha_pattern={k: float(v) for k, v in pattern.items()}, use_rslora=False,
    )
    cls = adapter_class(old_cfg.method)
    replacements = []
    for path, layer in layers:
        old = layer.adapters[name]
        new = cls.for_layer(layer.spec, new_cfg, path)
        with torch.no_grad():
            codec.write(new, codec.read(old).padded(ranks[path]))
        weight = layer.base_weight
        new.to(device=weight.device)
        new.train(old.training)
        for p_new, p_old in zip(new.parameters(), old.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        replacements.append((layer, new))
    for layer, new in replacements:
        layer.adapters[name] = new
    model.peft_config[name] = new_cfg


__all__ = ["hotswap_adapter", "prepare_model_for_compiled_hotswap", "read_adapter_dir"]
