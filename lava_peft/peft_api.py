"""HF PEFT's public names on lava-peft: a PEFT script runs with ``import lava_peft as peft``-style changes only.

================================  ===============================================================
PEFT                              here
================================  ===============================================================
``get_peft_model(model, cfg)``    :func:`get_peft_model` -> :class:`PeftModel` (an ``AdaptedModel``)
``PeftModel.from_pretrained``     reads our directories and HF PEFT LoRA/SHiRA ones
``PeftConfig`` / ``LoraConfig``   ``.from_pretrained(path)``: the stored config (ours or PEFT's, converted)
``AutoPeftModelFor*``             loads ``base_model_name_or_path`` with transformers' Auto class
``get/set_peft_model_state_dict`` the adapter's file tensors, and loading them back (checked)
``get_layer_status`` / ``..model_status``  PEFT's fields, from our layers
``prepare_model_for_kbit_training``  PEFT's steps: freeze, fp16/bf16 -> fp32, checkpointing on k-bit models
================================  ===============================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .adapter_files import read_adapter_dir
from .config import AdapterConfig, TaskType  # noqa: F401  (TaskType: re-exported)
from .errors import AdapterFileError, LavaConfigError, LavaError
from .inject import adapted_layers, saved_module_wrappers
from .interop import import_peft
from .model import AdaptedModel
from .quant import is_quantized_linear

__all__ = [
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification", "PeftConfig", "PeftModel", "TaskType", "TunerLayerStatus",
    "TunerModelStatus", "config_from_pretrained", "get_layer_status", "get_model_status", "get_peft_model",
    "get_peft_model_state_dict", "prepare_model_for_kbit_training", "set_peft_model_state_dict",
]

PeftConfig = AdapterConfig
"""PEFT's base config class: ``PeftConfig.from_pretrained(path)`` returns the stored config, whatever its method."""

# PEFT LoRA config fields that change the forward or the base weights (refused, as by import_peft), and the
# ones that carry no meaning here (ignored); every other PEFT field is read through our names/aliases.
_PEFT_FIELDS_READ = ("target_modules", "exclude_modules", "modules_to_save", "r", "lora_alpha", "rank_pattern",
                     "alpha_pattern", "lora_dropout", "use_rslora", "task_type", "inference_mode",
                     "base_model_name_or_path", "layers_to_transform", "layers_pattern", "bias", "fan_in_fan_out",
                     "init_lora_weights", "use_dora")


def _is_ours(payload: dict) -> bool:
    return isinstance(payload, dict) and "method" in payload and "config" in payload


def config_from_peft_dict(data: dict, source: str = "a PEFT config") -> AdapterConfig:
    """A :class:`~lava_peft.LoraConfig` with the meaning of a HF PEFT LoRA ``adapter_config.json``."""
    from .methods.lora import LoraConfig

    if data.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(f"{source} is a PEFT {data.get('peft_type')!r} config; only LORA configs convert "
                               "to a lava-peft config (load SHiRA adapters with lp.PeftModel.from_pretrained)")
    changing = [k for k in ("lora_bias", "layer_replication", "target_parameters") if data.get(k)]
    if changing:
        raise AdapterFileError(f"{source}: PEFT LoRA features {changing} are not supported here")
    fields = {k: data[k] for k in _PEFT_FIELDS_READ if k in data and data[k] is not None}
    try:
        return LoraConfig(**fields)
    except LavaConfigError as exc:
        raise AdapterFileError(f"{source}: {exc}") from None


def config_from_pretrained(cls: type, pretrained_model_name_or_path, **kwargs) -> AdapterConfig:
    """``cls.from_pretrained(path)``: the config stored in ``path`` (a lava-peft or HF PEFT LoRA directory).

    ``LoraConfig.from_pretrained`` refuses a directory holding another method's adapter; ``PeftConfig``
    (= :class:`AdapterConfig`) returns any.  Hub ids are not downloaded: pass a local directory."""
    directory = Path(pretrained_model_name_or_path)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory} is not a local adapter directory (lava-peft downloads nothing)")
    files = read_adapter_dir(directory, parse_config=False, load_tensors=False)
    if _is_ours(files.payload):
        config = read_adapter_dir(directory, load_tensors=False).config
    else:
        config = config_from_peft_dict(files.payload, str(files.config_path))
    if cls is not AdapterConfig and not isinstance(config, cls):
        raise AdapterFileError(f"{directory} holds a {type(config).__name__} ({config.method!r} adapter), "
                               f"not a {cls.__name__}; read it with lp.PeftConfig.from_pretrained")
    return config.replace(**kwargs) if kwargs else config


# =============================================================================== models
class PeftModel(AdaptedModel):
    """PEFT's ``PeftModel``: an :class:`~lava_peft.AdaptedModel` whose ``from_pretrained`` / ``load_adapter``
    also read HF PEFT directories, with ``get_layer_status`` / ``get_model_status``."""

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, adapter_name: str = "default", is_trainable: bool = False,
                        config: AdapterConfig | None = None, allow_nonfinite: bool = False, strict_base: bool = False,
                        **kwargs) -> "PeftModel":
        """Base model + adapter directory (lava-peft's, or a HF PEFT one) -> model with that adapter active.

        ``config``/``kwargs`` (PEFT's ``autocast_adapter_dtype``, ``low_cpu_mem_usage`` ...) are accepted
        and change nothing: the stored config is what was trained.  ``strict_base``: as
        :meth:`AdaptedModel.load_adapter`."""
        wrapped = cls(model)
        wrapped.load_adapter(model_id, adapter_name, is_trainable=is_trainable, allow_nonfinite=allow_nonfinite,
                             strict_base=strict_base)
        wrapped.set_adapter(adapter_name)
        if not is_trainable:
            wrapped.eval()
        return wrapped

    def load_adapter(self, model_id, adapter_name: str = "default", is_trainable: bool = False,
                     allow_nonfinite: bool = False, strict_base: bool = False, **kwargs) -> None:
        """Load a lava-peft or HF PEFT adapter directory as ``adapter_name`` (the active adapters stay as they were).

        ``strict_base=True`` (lava-peft folders only: a HF PEFT folder records nothing about its base weights)
        also checks the sha256 of every targeted base weight."""
        payload = read_adapter_dir(model_id, parse_config=False, load_tensors=False).payload
        if _is_ours(payload):
            return super().load_adapter(model_id, adapter_name, is_trainable=is_trainable,
                                        allow_nonfinite=allow_nonfinite, strict_base=strict_base)
        if strict_base:
            raise AdapterFileError(f"{model_id} is a HF PEFT folder: it records no hashes of its base weights, so "
                                   "strict_base=True cannot check them; load it without strict_base")
        active = self.active_adapters
        import_peft(self, model_id, adapter_name=adapter_name, is_trainable=is_trainable)
        if active:
            self.set_adapter(active)

    def get_layer_status(self) -> list["TunerLayerStatus"]:
        return get_layer_status(self)

    def get_model_status(self) -> "TunerModelStatus":
        return get_model_status(self)


def get_peft_model(model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """PEFT's ``get_peft_model``: freeze ``model``, add ``peft_config`` as ``adapter_name`` and activate it.

    The same as :func:`lava_peft.adapt` (adapter parameters are always fp32: ``autocast_adapter_dtype``
    changes nothing); ``mixed=True`` (PEFT's mixed adapter types) is not needed here: adapters of any
    methods mix on one model already.  ``revision`` (of the base model on the Hub) is not stored."""
    if not isinstance(peft_config, AdapterConfig):
        raise LavaConfigError(f"peft_config must be a lava-peft config (e.g. lp.LoraConfig); got "
                              f"{type(peft_config).__module__}.{type(peft_config).__name__}")
    return PeftModel(model, peft_config, adapter_name)


class _AutoPeftModel:
    """PEFT's ``AutoPeftModel*``: read the adapter's config, load ``base_model_name_or_path`` with a transformers
    Auto class (local files only) and the adapter on top."""

    _auto_class: str | None = None
    _by_task = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                "CAUSAL_LM": "AutoModelForCausalLM", "QUESTION_ANS": "AutoModelForQuestionAnswering",
                "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoModel"}

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is used through {type(self).__name__}.from_pretrained(path)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, adapter_name: str = "default", is_trainable: bool = False,
                        config: AdapterConfig | None = None, **kwargs) -> PeftModel:
        """``kwargs`` go to the transformers ``from_pretrained`` of the base model (e.g. ``torch_dtype``)."""
        import transformers

        stored = config_from_pretrained(AdapterConfig, pretrained_model_name_or_path)
        base_path = stored.base_model_name_or_path
        if not base_path:
            raise AdapterFileError(
                f"{pretrained_model_name_or_path}: the adapter config has no base_model_name_or_path, so the base "
                "model is unknown; load it yourself and use lp.PeftModel.from_pretrained(base, path)"
            )
        auto_name = cls._auto_class or cls._by_task.get(stored.task_type or "", "AutoModel")
        base = getattr(transformers, auto_name).from_pretrained(base_path, **kwargs)
        return PeftModel.from_pretrained(base, pretrained_model_name_or_path, adapter_name, is_trainable=is_trainable)


class AutoPeftModel(_AutoPeftModel):
    """The base model class follows the stored ``task_type`` (``AutoModel`` without one)."""


class AutoPeftModelForCausalLM(_AutoPeftModel):
    _auto_class = "AutoModelForCausalLM"


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    _auto_class = "AutoModelForSequenceClassification"


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    _auto_class = "AutoModelForTokenClassification"


# =============================================================================== state dicts
def get_peft_model_state_dict(model: AdaptedModel, state_dict: dict | None = None,
                              adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` writes for ``adapter_name`` (keys as in the file)."""
    if state_dict is not None:
        raise LavaError("get_peft_model_state_dict(state_dict=...) is not supported: the adapter's tensors are read "
                        "from the model")
    return model.adapter_file_tensors(adapter_name)


def set_peft_model_state_dict(model: AdaptedModel, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False):
    """Load tensors keyed as in :func:`get_peft_model_state_dict` into the existing adapter, after checking every
    key and shape (:class:`AdapterFileError` names what differs). Returns PEFT's ``(missing_keys, unexpected_keys)``
    result, both empty."""
    if ignore_mismatched_sizes:
        raise LavaError("ignore_mismatched_sizes=True is not supported: every tensor must fit its adapter")
    model.load_adapter_file_tensors(adapter_name, peft_model_state_dict)
    return torch.nn.modules.module._IncompatibleKeys([], [])


# =============================================================================== status
@dataclass
class TunerLayerStatus:
    """PEFT's per-layer status fields."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclass
class TunerModelStatus:
    """PEFT's model status fields (``adapter_model_type`` is ``"AdaptedModel"``; ``peft_types`` gives
    ``"LORA"`` for LoRA and the upper-cased method name otherwise)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Literal["irregular"]
    active_adapters: list[str] | Literal["irregular"]
    merged_adapters: list[str] | Literal["irregular"]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


def _grad_state(params: list[nn.Parameter]) -> bool | str:
    flags = {p.requires_grad for p in params}
    return flags.pop() if len(flags) == 1 else "irregular"


def _layer_status(name: str, module: nn.Module, adapters: dict[str, nn.Module], merged: list[str],
                  active: list[str], base: nn.Module, module_type: str) -> TunerLayerStatus:
    return TunerLayerStatus(
        name=name, module_type=module_type, enabled=not module.disabled,
        active_adapters=list(active), merged_adapters=list(merged),
        requires_grad={n: _grad_state(list(a.parameters())) for n, a in adapters.items()},
        available_adapters=sorted(adapters),
        devices={n: sorted({p.device.type for p in a.parameters()}) for n, a in adapters.items()},
        quantization_backend=type(base).__name__ if is_quantized_linear(base) else None,
    )


def get_layer_status(model: AdaptedModel) -> list[TunerLayerStatus]:
    """One :class:`TunerLayerStatus` per adapted layer and ``modules_to_save`` module; names and module types as
    PEFT reports them (``model.<module path>``; ``<method>.<layer type>``, ``ModulesToSaveWrapper``)."""
    if not isinstance(model, AdaptedModel):
        raise LavaError(f"get_layer_status needs a lava-peft model (lp.get_peft_model / lp.adapt); got "
                        f"{type(model).__name__}")
    out = []
    for path, layer in adapted_layers(model.model):
        methods = sorted({model.peft_config[n].method for n in layer.adapters if n in model.peft_config})
        out.append(_layer_status(f"model.{path}", layer, dict(layer.adapters), layer.merged_adapters,
                                 layer.active_adapters, layer.base_layer,
                                 f"{'+'.join(methods)}.{type(layer.base_layer).__name__}"))
    for path, wrapper in saved_module_wrappers(model.model):
        active = [wrapper.active_copy] if wrapper.active_copy is not None else []
        out.append(_layer_status(f"model.{path}", wrapper, dict(wrapper.copies), [], active,
                                 wrapper.original_module, "ModulesToSaveWrapper"))
    return out


def _same_or_irregular(values: list):
    return values[0] if values and all(v == values[0] for v in values) else ("irregular" if values else [])


def get_model_status(model: AdaptedModel) -> TunerModelStatus:
    """PEFT's summary of the adapters on ``model`` (``"irregular"`` where layers disagree)."""
    layers = get_layer_status(model)
    trainable, total = model.get_nb_trainable_parameters()
    requires_grad: dict[str, Any] = {}
    devices: dict[str, set] = {}
    for status in layers:
        for n, flag in status.requires_grad.items():
            requires_grad[n] = flag if requires_grad.get(n, flag) == flag else "irregular"
        for n, d in status.devices.items():
            devices.setdefault(n, set()).update(d)
    enabled = _same_or_irregular([s.enabled for s in layers])
    return TunerModelStatus(
        base_model_type=type(model.model).__name__, adapter_model_type="AdaptedModel",
        peft_types={n: "LORA" if c.method == "lora" else (type(c).peft_type or c.method.upper())
                    for n, c in model.peft_config.items()},
        trainable_params=trainable, total_params=total, num_adapter_layers=len(layers),
        enabled=True if enabled == [] else enabled,
        active_adapters=_same_or_irregular([sorted(s.active_adapters) for s in layers]),
        merged_adapters=_same_or_irregular([sorted(s.merged_adapters) for s in layers]),
        requires_grad=requires_grad, available_adapters=sorted(model.peft_config),
        devices={n: sorted(d) for n, d in devices.items()},
        quantization_backend=next((s.quantization_backend for s in layers if s.quantization_backend), None),
    )


# =============================================================================== k-bit training
def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """PEFT's preparation of a (quantized) base model before adding adapters, the same steps:

    1. freeze every parameter;
    2. cast every fp16/bf16 parameter to fp32 (quantized weights are integer buffers/params and stay);
    3. on a k-bit model (transformers' ``is_loaded_in_8bit/4bit``, a ``quantization_method``, or lava-peft's
       :func:`lava_peft.quant.quantize_linears` layers) with ``use_gradient_checkpointing``: make the input
       embeddings' output require grad (unless ``use_reentrant=False``) and turn on gradient checkpointing.
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    method = getattr(model, "quantization_method", None)
    method = getattr(method, "value", method)
    kbit = bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
                or method is not None or any(is_quantized_linear(m) for m in model.modules()))
    for param in model.parameters():
        param.requires_grad_(False)
    if method not in ("gptq", "aqlm", "eetq", "torchao", "hqq"):
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if kbit and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise LavaError(f"{type(model).__name__} has no gradient_checkpointing_enable(); pass "
                            "use_gradient_checkpointing=False")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
