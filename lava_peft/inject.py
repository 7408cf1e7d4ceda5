"""Which modules to adapt, and swapping wrappers in and out of a model.

Matching rules (the same as HF PEFT where PEFT has them):

* a list entry ``"query"`` matches a module named ``query`` or ending in ``.query``;
* a list entry ``"type:Conv2d"`` (or the class ``nn.Conv2d`` in the config) matches by type;
* a plain string is a regular expression matched against the full module name;
* ``"all-linear"``: every Linear / GPT-2 Conv1D except the output head;
  ``"all-conv"``: every Conv1d/2d/3d; ``"all"``: both (heads excluded).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .config import compile_module_pattern
from .errors import TargetModulesError, UnsupportedLayerError
from .fused_siblings import CandidateSet, SiblingGroup, candidate_sets
from .layers import SUPPORTED_LAYER_TYPES, AdaptedLayer, SavedModuleWrapper, layer_ops, walk_modules
from .module_layers import PLACEMENTS, ModuleAdapterHost, module_hosts, placement_selects
from .targets import in_selected_layers, names_module_or_parent

HEAD_NAMES = ("lm_head", "classifier", "score", "head", "cls")
"""Last name components treated as an output head by ``"all-linear"``/``"all"``."""


def _entry_matches(entry: str, name: str, module: nn.Module) -> bool:
    if entry.startswith("type:"):
        return type(module).__name__ == entry[5:]
    return name == entry or name.endswith("." + entry)


def name_matches(spec, name: str, module: nn.Module, field: str = "target_modules") -> bool:
    """Does ``spec`` (list of names/types or regex string) select this module?

    A regex is checked once (cached) for backtracking risks (``config._check_regex``), so a
    catastrophic pattern is a clear error instead of a hang."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return compile_module_pattern(field, spec).fullmatch(name) is not None
    return any(_entry_matches(e, name, module) for e in spec)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of modules that are the model's output head (never adapted by the keywords)."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except Exception:  # noqa: BLE001 - some models raise NotImplementedError here
            out = None
        if out is not None:
            heads.update(n for n, m in model.named_modules() if m is out)
    for name, _ in model.named_modules():
        parts = name.split(".")
        if any(p in HEAD_NAMES for p in parts):
            heads.add(name)
    return heads


def _keyword_selects(keyword: str, module: nn.Module) -> bool:
    ops = layer_ops(module)
    if ops is None:
        return False
    is_linear = ops.name in ("Linear", "Conv1D")
    is_conv = ops.name == "ConvNd"
    return (keyword == "all-linear" and is_linear) or (keyword == "all-conv" and is_conv) or (
        keyword == "all" and (is_linear or is_conv)
    )


def find_targets(model: nn.Module, config) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs the config selects; raises if none or if one is unsupported."""
    targets = config.target_modules
    keyword = targets if isinstance(targets, str) and targets in ("all-linear", "all-conv", "all") else None
    heads = output_head_names(model) if keyword else set()
    save_names = config.modules_to_save or []
    selected = []
    for name, found in walk_modules(model, _WRAPPERS):  # modules inside a wrapper are not targets
        if not name or isinstance(found, SavedModuleWrapper):
            continue
        # a layer wrapped by an earlier adapter is matched through its base layer
        module = found.base_layer if isinstance(found, AdaptedLayer) else found
        if keyword:
            hit = _keyword_selects(keyword, module) and name not in heads
        else:
            hit = name_matches(targets, name, module)
        if not hit or name_matches(config.exclude_modules, name, module, "exclude_modules"):
            continue
        if isinstance(targets, list) and name not in targets and not in_selected_layers(config, name):
            continue  # layers_to_transform (PEFT: an exact name in the list is kept whatever its layer)
        if any(names_module_or_parent(s, name) for s in save_names):
            continue  # never adapt a module saved whole, or one inside it (PEFT's rule)
        if layer_ops(module) is None:
            if isinstance(targets, list) or keyword:
                raise UnsupportedLayerError(
                    f"module {name!r} ({type(module).__name__}) matched target_modules={targets!r} but "
                    f"cannot be adapted; supported layer types: {SUPPORTED_LAYER_TYPES}. "
                    "Name its Linear/Conv children instead, or add it to exclude_modules"
                )
            continue  # a regex may legitimately match containers; skip them
        ignored_because = weight_read_directly(model, name)
        if ignored_because:
            explicit = not keyword and (isinstance(targets, str) or any(
                not e.startswith("type:") and _entry_matches(e, name, module) for e in targets))
            if explicit:
                raise UnsupportedLayerError(f"cannot adapt {name!r}: {ignored_because}")
            warnings.warn(f"target_modules={targets!r}: skipping {name!r}: {ignored_because}", stacklevel=3)
            continue
        selected.append((name, found))
    if not selected:
        examples = [n for n, m in model.named_modules() if n and layer_ops(m) is not None
                    and not _inside_wrapper(model, n) and weight_read_directly(model, n) is None]
        examples = examples[:8]
        raise TargetModulesError(
            f"target_modules={targets!r} matched no adaptable module. "
            f"Adaptable modules in this model include: {examples}. "
            'Use names or suffixes from that list, a regex, "all-linear", "all-conv" or layer types'
        )
    return selected


def _fastpath_enabled() -> bool:
    get = getattr(getattr(torch.backends, "mha", None), "get_fastpath_enabled", None)
    return True if get is None else bool(get())


def weight_read_directly(model: nn.Module, name: str) -> str | None:
    """Why an adapter on module ``name`` would be silently ignored, or None.

    Some parents read a child layer's ``.weight`` directly instead of calling the child, so a
    wrapper's unmerged increment never enters the output (merging would, which hides it):

    * ``nn.MultiheadAttention.out_proj``: ``F.multi_head_attention_forward`` uses
      ``out_proj.weight`` (always);
    * ``nn.TransformerEncoderLayer.linear1/linear2``: its inference fast path (eval mode and no
      grad) passes both weights to one fused kernel, unless the fast path is switched off.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return ("nn.MultiheadAttention reads out_proj.weight directly (not through the module), so the adapter "
                "would change nothing unless merged. Adapt the layers around the attention instead (e.g. the "
                "feed-forward linear1/linear2, or write attention with your own nn.Linear q/k/v/out layers)")
    if isinstance(parent, nn.TransformerEncoderLayer) and child in ("linear1", "linear2") and _fastpath_enabled():
        return ("nn.TransformerEncoderLayer's inference fast path (eval mode, no grad) reads linear1/linear2 "
                "weights directly, so the adapter would be ignored at inference. Call "
                "torch.backends.mha.set_fastpath_enabled(False) before adapt() to adapt them")
    return None


_WRAPPERS = (AdaptedLayer, SavedModuleWrapper, ModuleAdapterHost)


def _inside_wrapper(model: nn.Module, name: str) -> bool:
    """True for modules living inside an AdaptedLayer/SavedModuleWrapper (their base layer, copies)."""
    parts = name.split(".")
    module = model
    for part in parts[:-1]:
        module = getattr(module, part)
        if isinstance(module, (AdaptedLayer, SavedModuleWrapper, ModuleAdapterHost)):
            return True
    return False


def find_modules_to_save(model: nn.Module, names: list[str] | None) -> list[tuple[str, nn.Module]]:
    if not names:
        return []
    found = []
    for name, module in model.named_modules():
        if name and any(name == s or name.endswith("." + s) for s in names) and not _inside_wrapper(model, name):
            found.append((name, module))
    missing = [s for s in names if not any(n == s or n.endswith("." + s) for n, _ in found)]
    if missing:
        raise TargetModulesError(
            f"modules_to_save entries {missing} match no module in the model; "
            f"top-level modules are {[n for n, _ in model.named_children()]}"
        )
    return found


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def adapted_layers(model: nn.Module):
    """``(name, host)`` pairs of every adapter host, names as in the original model (no ``.base_layer``):
    :class:`AdaptedLayer` (weight adapters) and :class:`~lava_peft.module_layers.ModuleAdapterHost`
    (module adapters, named by the module they transform)."""
    for name, module in walk_modules(model):
        if isinstance(module, AdaptedLayer):
            yield name, module
    yield from module_hosts(model)


def _linear_width(layer: AdaptedLayer) -> int | None:
    return layer.base_layer.in_features if type(layer.base_layer) is nn.Linear else None


def link_shared_input_layers(model: nn.Module, enabled: bool = True) -> list[CandidateSet]:
    """Point adapted plain Linears of one parent with equal ``in_features`` (q/k/v, gate/up, …) at a
    :class:`~lava_peft.fused_siblings.CandidateSet`: the next forward pass shows which of them read the
    same input, and those run as one node from then on (``enabled=False``: observed, never fused)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, AdaptedLayer)]
    return candidate_sets(layers, _linear_width, enabled=enabled)


def shared_input_groups(model: nn.Module) -> list[SiblingGroup | CandidateSet]:
    """The distinct sibling groups (decided) and candidate sets (still observing) of the model's layers."""
    found: dict[int, SiblingGroup | CandidateSet] = {}
    for _, m in model.named_modules():
        group = getattr(m, "sibling_group", None) if isinstance(m, AdaptedLayer) else None
        if group is not None:
            found.setdefault(id(group), group)
    return list(found.values())


def find_module_targets(model: nn.Module, config, extra: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs a module adapter's config selects: a placement keyword
    (:data:`~lava_peft.module_layers.PLACEMENTS`), or names/suffixes, ``type:`` entries and regexes as for
    weight adapters — any module, not only layers; plus the names in ``extra`` (suffixes).  The
    outermost match wins (a module inside a selected one is not selected again)."""
    targets = config.target_modules
    placement = targets if isinstance(targets, str) and targets in PLACEMENTS else None
    save_names = config.modules_to_save or []
    selected: list[tuple[str, nn.Module]] = []
    for name, found in walk_modules(model, _WRAPPERS):
        if not name or isinstance(found, (SavedModuleWrapper, ModuleAdapterHost)):
            continue
        module = found.base_layer if isinstance(found, AdaptedLayer) else found
        hit = placement_selects(placement, name, module) if placement else name_matches(targets, name, module)
        hit = hit or any(name == e or name.endswith("." + e) for e in extra or [])
        if not hit or name_matches(config.exclude_modules, name, module, "exclude_modules"):
            continue
        if any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in save_names):
            continue
        if any(name.startswith(prev + ".") for prev, _ in selected):
            continue
        selected.append((name, found))
    if not selected:
        raise TargetModulesError(
            f"target_modules={targets!r} matched no module. Use a placement keyword {list(PLACEMENTS)}, module "
            f"names or suffixes (e.g. 'mlp', 'encoder.layer.0'), 'type:<ClassName>' entries or a regex"
        )
    return selected


def saved_module_wrappers(model: nn.Module):
    for name, module in walk_modules(model):
        if isinstance(module, SavedModuleWrapper):
            yield name, module

