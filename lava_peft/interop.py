"""Hugging Face PEFT interop: export to and import from a PEFT LoRA directory.

PEFT LoRA computes, per module, ``y = base(x) + s · B(A(dropout(x)))`` with
``s = lora_alpha / r`` (``/ √r`` with ``use_rslora``), ``r``/``lora_alpha`` overridden per
module by ``rank_pattern``/``alpha_pattern``.  Its files are ``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``base_model.model.<path>.lora_A.weight`` /
``lora_B.weight`` (Linear, GPT-2 ``Conv1D``, ConvNd) and ``lora_embedding_A`` /
``lora_embedding_B`` (Embedding), plus ``base_model.model.<path>.<param>`` for
``modules_to_save`` copies.

Correspondence (canonical layout ``ΔW ∈ R^{O×I×K…}``):

==================  ==========================  =====================================
ours                PEFT tensor                 shape
==================  ==========================  =====================================
LoRA ``lora_A``     ``lora_A.weight``           ``(r, I)``; conv ``(r, C_in, *K)``
LoRA ``lora_B``     ``lora_B.weight``           ``(O, r)``; conv ``(O, r, 1, …)``
LAVA ``lava_V``     ``lora_A`` (Linear/Emb.)    ``(r, I)``
LAVA ``lava_U``     ``lora_B`` (Linear/Emb.)    ``(O, r)``
Embedding A / B     ``lora_embedding_A`` / B    ``(r, vocab)`` / ``(dim, r)``
==================  ==========================  =====================================

LAVA on Linear/Embedding *is* a LoRA (its orthogonality term only matters in training),
so it exports with the same rank and scale.  A conv LAVA adapter is a CP sum
``ΔW = s Σ_j u_j ⊗ v_j ⊗ p_{1j} ⊗ …``; every component is rank 1 in the flattening
``O × (I·ΠK)``, so it is *exactly* the flattened LoRA ``B = U``,
``A_j = v_j ⊗ p_{1j} ⊗ …`` of the same rank ``r`` — but with ``r·(O + I·ΠK)``
parameters instead of ``r·(O + I + ΣK)``, and it can no longer be re-imported as CP.
``allow_rank_expansion=True`` is required for that, and for grouped convs: PEFT's
``lora_A`` convolves all input channels, so a grouped increment of rank ``r`` needs
rank ``r·groups`` (``A`` block-placed per group, ``B`` a grouped 1×1 conv).  PEFT's conv
LoRA ignores the base conv's dilation and padding mode, so such convs cannot be
exported (or imported) exactly and are refused.

Scales are kept as PEFT computes them: per module ``r`` and ``lora_alpha`` equal to ours
(``rank_pattern``/``alpha_pattern`` keyed by the regex-escaped module path) whenever the
rank is unchanged; otherwise ``lora_alpha = s·r'`` (``s·√r'``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .config import _pattern_lookup, config_class, method_hook, registered_methods
from .methods.factors import _CODECS
from .errors import AdapterFileError, IncompatibleBaseModelError, LavaConfigError
from .inject import adapted_layers, saved_module_wrappers
from .peft_common import LORA_KEY, PREFIX, base_layer_at, lora_config_fields, lora_tensors  # noqa: F401
from .adapter_files import WEIGHTS_NAME, read_adapter_dir, write_adapter_dir
from .methods.base_init import base_init_kind, reproducible_on_load
from .layers import ConvOps, EmbeddingOps, GPT2Conv1DOps, SavedModuleWrapper, layer_ops


# PEFT LoraConfig fields that change the forward or the base weights: refused on import.
_UNSUPPORTED_FLAGS = (
    "lora_bias", "layer_replication", "target_parameters", "alora_invocation_tokens",
    "trainable_token_indices", "arrow_config", "velora_config", "kasa_config", "monteclora_config",
    "use_bdlora", "use_qalora", "lora_ga_config",
)
_BASE_CHANGING_INITS = ("corda", "loftq")  # PiSSA / OLoRA are re-derived from the base; EVA/orthogonal leave it


# =============================================================================== export
def export_peft(
    model,
    save_directory: str,
    adapter_name: str | None = None,
    allow_rank_expansion: bool = False,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write adapter ``adapter_name`` (default: the active one) as a HF PEFT LoRA directory
    (a method whose config names a ``peft_export`` hook, e.g. SHiRA, writes its own PEFT format).

    ``peft.PeftModel.from_pretrained(base, save_directory)`` then gives the same outputs as
    ``model`` with that adapter active.  Raises :class:`LavaConfigError` (before writing
    anything) for methods without low-rank factors, for conv LAVA / grouped convs without
    ``allow_rank_expansion=True``, and for dilated or non-zero-padded convs.
    """
    name = adapter_name or model.active_adapter
    model.check_known(name)
    config = model.peft_config[name]
    if config.peft_export is not None:  # a method with its own PEFT format (e.g. SHiRA)
        return method_hook(config.peft_export)(model, save_directory, name, base_model_name_or_path)
    if config.peft_export_refusal is not None:
        raise LavaConfigError(config.peft_export_refusal.format(name=name))
    codec = _CODECS.get(config.method)
    if codec is None:
        raise LavaConfigError(
            f"adapter {name!r} is a {config.method!r} adapter, which has no low-rank factors and cannot be a PEFT "
            "LoRA; turn it into one with model.add_weighted_adapter([name], [1.0], 'x', 'svd', svd_rank=...)"
        )
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    fan_in_fan_out = False
    for path, layer in adapted_layers(model.model):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        with torch.no_grad():
            factors = codec.read(adapter, scaled=False)
        spec, ops, base = layer.spec, layer.ops, layer.base_layer
        r = factors.rank
        if isinstance(ops, EmbeddingOps):
            tensors.update(lora_tensors(path, ops, spec, factors.up, factors.modes[0]))
        elif isinstance(ops, ConvOps):
            _check_conv_exportable(path, base)
            if (factors.is_cp or factors.is_tucker) and not allow_rank_expansion:
                raise LavaConfigError(
                    f"{path}: a conv LAVA adapter is a CP sum (or Tucker-2); PEFT can only hold it as a flattened LoRA of the same "
                    f"rank with r·(O + I·ΠK) = {r * (spec.out_dim + spec.in_dim * math.prod(spec.kernel_size))} "
                    f"parameters instead of {sum(p.numel() for p in adapter.parameters())}; pass "
                    "allow_rank_expansion=True to export it that way"
                )
            groups = spec.groups
            if groups > 1 and not allow_rank_expansion:
                raise LavaConfigError(
                    f"{path}: grouped conv (groups={groups}); PEFT's lora_A convolves all input channels, so the "
                    f"exact export needs rank r·groups = {r * groups}; pass allow_rank_expansion=True"
                )
            factors = factors.flattened()
            r = factors.rank
            down = factors.modes[0].reshape(r, spec.in_dim, *spec.kernel_size)
            if groups > 1:
                a = down.new_zeros(r * groups, spec.in_dim * groups, *spec.kernel_size)
                for g in range(groups):
                    a[g * r:(g + 1) * r, g * spec.in_dim:(g + 1) * spec.in_dim] = down
                down, r = a, r * groups
            tensors.update(lora_tensors(path, ops, spec, factors.up, down))
        else:
            fan_in_fan_out = fan_in_fan_out or isinstance(ops, GPT2Conv1DOps)
            tensors.update(lora_tensors(path, ops, spec, factors.up, factors.modes[0]))
        magnitude = getattr(adapter, "dora_magnitude", None)  # DoRA (use_dora=True): PEFT's magnitude vector
        if magnitude is not None:
            if r != factors.rank:
                raise LavaConfigError(f"{path}: a DoRA adapter cannot be exported with rank expansion (grouped conv)")
            shape = (1, -1, *((1,) * len(spec.kernel_size))) if isinstance(ops, ConvOps) else (-1,)
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = magnitude.detach().reshape(shape)
        ranks[path] = r
        if r == adapter.r and config.scale_for(path) == adapter.scale:
            alphas[path] = float(config.alpha_for(path))
        else:
            alphas[path] = adapter.scale * (math.sqrt(r) if config.use_rslora else r)
    if not ranks:
        raise LavaConfigError(f"adapter {name!r} adapts no layer; nothing to export")
    saved = []
    names = [n for n, _ in model.model.named_modules()]
    for path, wrapper in saved_module_wrappers(model.model):
        if name not in wrapper.copies:
            continue
        clash = [n for n in names if n != path and n.endswith(path) and ".copies." not in n
                 and ".original_module" not in n]
        if clash:
            raise LavaConfigError(
                f"modules_to_save module {path!r} is a name suffix of {clash[:3]}; PEFT matches modules_to_save by "
                "suffix and would also wrap those. Rename the module or drop it from modules_to_save"
            )
        saved.append(path)
        for key, value in wrapper.copies[name].state_dict().items():
            tensors[f"{PREFIX}{path}.{key}"] = value
    for path in ranks:
        if any(path == s or path.startswith(s + ".") for s in saved):
            raise LavaConfigError(f"{path} is both adapted and inside modules_to_save; PEFT cannot hold both")

    peft_config = lora_config_fields(
        ranks, alphas, use_rslora=config.use_rslora, dropout=config.dropout, fan_in_fan_out=fan_in_fan_out,
        saved=saved, base_model_name_or_path=base_model_name_or_path or config.base_model_name_or_path,
        task_type=config.task_type, use_dora=bool(getattr(config, "use_dora", False)))
    init = getattr(config, "init", None)
    if base_init_kind(init):  # PEFT re-derives the residual from the original base on load, as we do
        if not reproducible_on_load(init):
            raise LavaConfigError(f"adapter {name!r} is an unconverted {init!r} adapter, whose randomized residual "
                                  "PEFT cannot recompute; save it with model.save_pretrained(dir, "
                                  "convert_pissa_to_lora=True) (a plain LoRA folder PEFT reads)")
        peft_config["init_lora_weights"] = init
    out = Path(save_directory)
    if out.exists() and not out.is_dir():
        raise AdapterFileError(f"{out} exists and is not a directory; choose another save_directory")
    cpu = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
           for k, v in tensors.items()}
    write_adapter_dir(out, peft_config, cpu, {"format": "pt"})


def _check_conv_exportable(path: str, conv: nn.Module) -> None:
    if any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros":
        raise LavaConfigError(
            f"{path}: conv with dilation={conv.dilation}, padding_mode={conv.padding_mode!r}; PEFT's conv LoRA runs "
            "lora_A without dilation and with zero padding, so its output would differ. Exclude this layer"
        )


# =============================================================================== import
def import_peft(model, model_id: str, adapter_name: str = "default", is_trainable: bool = False):
    """Load a HF PEFT LoRA directory into an :class:`~lava_peft.AdaptedModel` as a LoRA adapter
    (another PEFT type through the method whose config declares it: ``peft_type`` / ``peft_import``, e.g. SHiRA).

    ``model`` is the base model (or an existing AdaptedModel to add to).  The adapter is
    activated; its outputs equal ``peft.PeftModel.from_pretrained(base, model_id)``'s.
    DoRA adapters (``use_dora``) import as ``LoraConfig(use_dora=True)``.
    Refuses (before touching the model) non-LoRA PEFT types, lora_bias / other
    variants that change the forward, CorDA / LoftQ (base weights changed from data / by quantization),
    an unconverted ``pissa_niter_<K>`` adapter (its randomized residual cannot be recomputed), pickle
    weights, and grouped / dilated convs.  An unconverted PiSSA / OLoRA adapter is imported as PEFT loads
    it: onto the original base, whose weights become the residual re-derived from them (PEFT's files
    carry no base hashes, so the base cannot be checked: pass the original model, not the residual).
    """
    from .methods.lora import LoraConfig
    from .model import AdaptedModel

    files = read_adapter_dir(model_id, kind="PEFT adapter", parse_config=False, load_tensors=False)
    directory, cfg = files.directory, files.payload
    importer = _peft_importer(cfg.get("peft_type"))
    if importer is not None:
        if files.weights_bytes is None:
            raise AdapterFileError(f"{directory} has no {WEIGHTS_NAME} (lava-peft never loads pickle weights)")
        return importer(model, directory, cfg, files.read_tensors(), adapter_name, is_trainable)
    if cfg.get("peft_type") != "LORA":
        known = ["LORA", *sorted(t for t, _ in _peft_imports())]
        raise AdapterFileError(f"{directory} holds a PEFT {cfg.get('peft_type')!r} adapter; only "
                               f"{' and '.join(known)} can be imported")
    bad = [f for f in _UNSUPPORTED_FLAGS if cfg.get(f)]
    if cfg.get("bias", "none") != "none":
        bad.append(f"bias={cfg['bias']!r}")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        bad.append(f"init_lora_weights={init!r} (changes the base weights from data or quantization)")
    base_init = init if base_init_kind(init) else "default"
    if base_init != "default" and not reproducible_on_load(init):
        raise AdapterFileError(
            f"{directory}: an unconverted PEFT {init!r} adapter cannot be imported: its base weights were replaced by "
            "a residual from a randomized SVD that cannot be recomputed identically. Convert it with PEFT first "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=<folder saved after init>)) and import that")
    if bad:
        raise AdapterFileError(f"{directory}: PEFT LoRA features {bad} are not supported by import_peft")
    if files.weights_bytes is None:
        if (directory / "adapter_model.bin").is_file():
            raise AdapterFileError(
                f"{directory} has only adapter_model.bin (a pickle), which lava-peft never loads; re-save it with "
                "PEFT's save_pretrained(safe_serialization=True)"
            )
    tensors = files.read_tensors()
    weights_path = files.weights_path

    wrapped = model if isinstance(model, AdaptedModel) else AdaptedModel(model)
    base = wrapped.model
    lora: dict[str, dict[str, torch.Tensor]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    other: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{weights_path}: key {key!r} does not start with {PREFIX!r}; not a PEFT LoRA file")
        key = key[len(PREFIX):]
        m = LORA_KEY.fullmatch(key)
        dora = re.fullmatch(r"(.+)\.lora_magnitude_vector(?:\.weight)?", key)
        if dora and cfg.get("use_dora"):
            magnitudes[dora.group(1)] = value
        elif m:
            lora.setdefault(m.group(1), {})[m.group(2).split(".")[0].replace("lora_embedding_", "lora_")] = value
        else:
            other[key] = value
    if not lora:
        raise AdapterFileError(f"{weights_path} contains no LoRA tensors")

    ranks, alphas, tensors_for = {}, {}, {}
    problems = []
    for path, parts in lora.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise AdapterFileError(f"{weights_path}: {path} has {sorted(parts)}, expected lora_A and lora_B")
        layer_base = base_layer_at(base, path, problems)
        if layer_base is None:
            continue
        ops = layer_ops(layer_base)
        if ops is None:
            problems.append(f"{path}: {type(layer_base).__name__} is not an adaptable layer")
            continue
        spec = ops.spec(layer_base)
        a, b = parts["lora_A"], parts["lora_B"]
        r = a.shape[0]
        if isinstance(ops, ConvOps):
            if spec.groups > 1:
                problems.append(f"{path}: PEFT LoRA on a grouped conv is not a grouped increment; cannot import")
                continue
            _check_conv_exportable(path, layer_base)
        fan_in = spec.in_dim * math.prod(spec.kernel_size)
        if a.numel() != r * fan_in or b.numel() != spec.out_dim * r:
            problems.append(f"{path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit weight "
                            f"{tuple(layer_base.weight.shape)}")
            continue
        if cfg.get("use_dora") and (path not in magnitudes or magnitudes[path].numel() != spec.out_dim):
            problems.append(f"{path}: use_dora=True but no lora_magnitude_vector of {spec.out_dim} entries")
            continue
        ranks[path] = r
        alphas[path] = float(_pattern_lookup(cfg.get("alpha_pattern") or {}, path, cfg.get("lora_alpha", 8)))
        tensors_for[path] = (a.reshape(r, fan_in), b.reshape(spec.out_dim, r))
    if problems:
        raise IncompatibleBaseModelError(
            f"the PEFT adapter in {directory} does not fit this base model: {'; '.join(problems[:5])}"
        )
    saved_modules = _saved_module_paths(base, other, weights_path)

    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(
        target_modules="(?:" + "|".join(re.escape(p) for p in ranks) + ")",
        modules_to_save=sorted(saved_modules) or None,
        r=r0,
        alpha=a0,
        rank_pattern={f"^{re.escape(p)}$": r for p, r in ranks.items() if r != r0},
        alpha_pattern={f"^{re.escape(p)}$": a for p, a in alphas.items() if a != a0},
        dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
        use_rslora=bool(cfg.get("use_rslora", False)),
        use_dora=bool(cfg.get("use_dora", False)),
        init=base_init,  # PiSSA / OLoRA: re-derived from this (original) base, which becomes the residual, as in PEFT
    )
    plan = wrapped.plan(adapter_name, config, target_names=list(ranks))
    with torch.no_grad():
        for path, _, adapter in plan.layers:
            a, b = tensors_for[path]
            adapter.lora_A.copy_(a)
            adapter.lora_B.copy_(b)
            if path in magnitudes:
                adapter.dora_magnitude.copy_(magnitudes[path].reshape(-1))
    for path, state in saved_modules.items():
        found = base.get_submodule(path)
        source = found.original_module if isinstance(found, SavedModuleWrapper) else found
        expected = source.state_dict()
        if set(expected) != set(state) or any(expected[k].shape != state[k].shape for k in expected):
            raise AdapterFileError(f"{weights_path}: the saved copy of {path} does not match the module's tensors")
    if not is_trainable:
        wrapped.inference_only.add(adapter_name)
    wrapped.commit(plan)
    for path, wrapper in saved_module_wrappers(base):
        if path in saved_modules and adapter_name in wrapper.copies:
            wrapper.copies[adapter_name].load_state_dict(saved_modules[path])
    wrapped.set_adapter(adapter_name)
    if not is_trainable:
        wrapped.eval()
    return wrapped


def _saved_module_paths(base: nn.Module, other: dict[str, torch.Tensor], source) -> dict[str, dict[str, torch.Tensor]]:
    """Group non-LoRA keys ``<module path>.<tensor>`` by the module owning them (modules_to_save)."""
    modules = dict(base.named_modules())
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in other.items():
        parts = key.split(".")
        owner = None
        for cut in range(len(parts) - 1, 0, -1):
            path = ".".join(parts[:cut])
            module = modules.get(path)
            if module is None:
                continue
            inner = module.original_module if isinstance(module, SavedModuleWrapper) else module
            if ".".join(parts[cut:]) in inner.state_dict():
                owner = path
                break
        if owner is None:
            raise AdapterFileError(f"{source}: tensor {key!r} belongs to no module of this base model")
        out.setdefault(owner, {})[key[len(owner) + 1:]] = value
    return out


def _peft_imports() -> list[tuple[str, str]]:
    """``(peft_type, hook)`` of every registered method that imports a PEFT type of its own."""
    hooks = []
    for method in registered_methods():
        cls = config_class(method)
        if cls.peft_type is not None and cls.peft_import is not None:
            hooks.append((cls.peft_type, cls.peft_import))
    return hooks


def _peft_importer(peft_type):
    return next((method_hook(hook) for t, hook in _peft_imports() if t == peft_type), None)


__all__ = ["export_peft", "import_peft"]
