"""What to adapt and to save when the config leaves it to the model (HF PEFT's conveniences).

* ``target_modules=None``: the architecture's default targets (:data:`DEFAULT_TARGET_MODULES`,
  keyed by ``model.config.model_type``; the same choices as HF PEFT's LoRA defaults);
* ``task_type="SEQ_CLS"``/``"TOKEN_CLS"``/``"QUESTION_ANS"``: the task's head joins ``modules_to_save``
  (:data:`lava_peft.config.TASK_HEADS`);
* ``base_model_name_or_path``: filled from the model's ``name_or_path``;
* heads that transformers initialised freshly (not in the checkpoint) and that the adapter would
  neither adapt nor save are reported (:func:`newly_initialized_modules`).

:func:`resolve_for_model` applies all of them to a config and says what it chose; the model's
``plan`` calls it for every new adapter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .config import TASK_HEADS, AdapterConfig
from .errors import TargetModulesError
from .layers import AdaptedLayer, SavedModuleWrapper, walk_modules

DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    # encoders (BERT family, incl. sentence-transformers MiniLM)
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "layoutlm": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    # decoders with q/k/v/o projections (Llama, Mistral, Qwen, Gemma, ...)
    "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neo": ["q_proj", "v_proj"], "bart": ["q_proj", "v_proj"],
    # fused attention projections
    "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"], "gpt_neox": ["query_key_value"], "bloom": ["query_key_value"],
    "falcon": ["query_key_value"], "mpt": ["Wqkv"], "codegen": ["qkv_proj"],
    # encoder-decoders
    "t5": ["q", "v"], "mt5": ["q", "v"],
}
"""``model.config.model_type`` -> the layers adapted when ``target_modules`` is not given (HF PEFT's choices)."""


@dataclass
class Resolved:
    """A config completed for one model, with what was filled in (``notes``, printed) and what the user
    should know (``warnings``)."""

    config: AdapterConfig
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def default_target_modules(model: nn.Module) -> list[str]:
    """The default targets of the model's architecture; :class:`TargetModulesError` naming the options if none."""
    kind = model_type(model)
    if kind in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[kind])
    what = f"model type {kind!r}" if kind else f"a {type(model).__name__} (not a transformers model)"
    raise TargetModulesError(
        f"target_modules was not given and there is no default for {what}. Name the layers to adapt: a list of "
        'module names or suffixes (e.g. ["q_proj", "v_proj"]), a regex, "all-linear", "all-conv", or layer types '
        f"(e.g. [torch.nn.Conv2d]). Architectures with defaults: {sorted(DEFAULT_TARGET_MODULES)}"
    )


def _present(model: nn.Module, suffix: str) -> bool:
    return any(n == suffix or n.endswith("." + suffix) for n, _ in model.named_modules())


def task_heads(model: nn.Module, task_type: str | None) -> list[str]:
    """The task's head modules (PEFT's names) that exist in ``model``."""
    return [h for h in TASK_HEADS.get(task_type or "", ()) if _present(model, h)]


def layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    """HF PEFT's layer index of module ``name``: the first number after ``<layers_pattern>.`` (any pattern
    given), or, without a pattern, after the first two name components; ``None`` when there is none."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def in_selected_layers(config: AdapterConfig, name: str) -> bool:
    """Does ``layers_to_transform`` (with ``layers_pattern``) keep module ``name``? True when not set."""
    layers = config.layers_to_transform
    if layers is None or layers == []:
        return True
    index = layer_index(name, config.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def newly_initialized_modules(model: nn.Module) -> list[str]:
    """Modules whose own parameters transformers initialised freshly when it loaded ``model`` (missing from
    the checkpoint, e.g. a new classification head); empty for a model not loaded by ``from_pretrained``.

    transformers marks every parameter it loaded with ``_is_hf_initialized``; a module with parameters
    but none so marked, in a model where others are, was created from scratch."""
    loaded_any = False
    fresh = []
    for name, module in walk_modules(model, (AdaptedLayer, SavedModuleWrapper)):
        if isinstance(module, (AdaptedLayer, SavedModuleWrapper)):
            continue  # adapters and saved copies (not walked into): another adapter's business
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        marked = [getattr(p, "_is_hf_initialized", False) is True for p in own]
        loaded_any = loaded_any or any(marked)
        if not any(marked):
            fresh.append(name)
    return fresh if loaded_any else []


def names_module_or_parent(name: str, module: str) -> bool:
    """``name`` (a module name or a ``.``-suffix of one) names ``module`` or one of its parents (PEFT's
    ``modules_to_save`` exclusion rule)."""
    parts = module.split(".")
    want = name.split(".")
    return any(parts[end - len(want):end] == want for end in range(len(want), len(parts) + 1))


def resolve_for_model(model: nn.Module, config: AdapterConfig) -> Resolved:
    """``config`` completed for ``model`` (never modified in place): default targets, the task's head in
    ``modules_to_save``, ``base_model_name_or_path``; with a note for each choice made."""
    changes: dict = {}
    notes: list[str] = []
    name_or_path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if config.base_model_name_or_path is None and isinstance(name_or_path, str) and name_or_path:
        changes["base_model_name_or_path"] = name_or_path
    if config.target_modules is None:
        changes["target_modules"] = default_target_modules(model)
        notes.append(f"target_modules not given: adapting {changes['target_modules']} "
                     f"(the default for model type {model_type(model)!r})")
    heads = [h for h in task_heads(model, config.task_type) if h not in (config.modules_to_save or [])]
    if heads:
        changes["modules_to_save"] = [*(config.modules_to_save or []), *heads]
        notes.append(f"task_type={config.task_type}: the head {heads} is trained fully and saved with the adapter "
                     "(modules_to_save)")
    return Resolved(config.replace(**changes) if changes else config, notes)


def untrained_new_modules(model: nn.Module, adapted: list[str], saved: list[str]) -> list[str]:
    """Freshly initialised modules (:func:`newly_initialized_modules`) that are neither adapted nor saved
    (nor inside a saved module): they would stay random and be missing from the adapter files."""
    covered = list(adapted) + list(saved)
    return [m for m in newly_initialized_modules(model) if not any(names_module_or_parent(c, m) for c in covered)]
