"""What the whole-model method tools share."""

from __future__ import annotations

from ..config import AdapterConfig
from ..errors import AdapterNameError, LavaConfigError


def adapter_of_method(model, adapter_name: str | None, config_cls: type[AdapterConfig], purpose: str):
    """``(name, config, [(path, adapter)])`` of adapter ``adapter_name`` (default: the active one) of
    ``model``, which must be a ``config_cls`` adapter (``purpose`` says what needs it)."""
    method = config_cls.method
    name = adapter_name or model.active_adapter
    if name is None:
        raise AdapterNameError(f"the model has no active adapter; pass adapter_name=<a {method} adapter>")
    model.check_known(name)
    config = model.peft_config[name]
    if not isinstance(config, config_cls):
        raise LavaConfigError(
            f"adapter {name!r} is a {config.method!r} adapter; {purpose} needs a {method!r} adapter "
            f"(this model's adapters: {sorted(model.peft_config)})"
        )
    return name, config, model.adapter_layers(name)
