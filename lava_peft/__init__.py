"""lava-peft: parameter-efficient fine-tuning for language and vision models.

    import lava_peft as lp
    model = lp.adapt(model, lp.LavaConfig(r=8, alpha=16, target_modules="all-linear"))
"""

__version__ = "0.1.0"

from .config import AdapterConfig, registered_methods
from .errors import (
    AdapterFileError,
    AdapterNameError,
    IncompatibleBaseModelError,
    LavaConfigError,
    LavaError,
    TargetModulesError,
    UnsupportedLayerError,
)
from .layers import BASE_NAME, AdaptedLayer
from .methods import DeltaAdapter, LavaConfig, LoraConfig
from .model import AdaptedModel, adapt

__all__ = [
    "AdaptedLayer",
    "AdaptedModel",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterNameError",
    "BASE_NAME",
    "DeltaAdapter",
    "IncompatibleBaseModelError",
    "LavaConfig",
    "LavaConfigError",
    "LavaError",
    "LoraConfig",
    "TargetModulesError",
    "UnsupportedLayerError",
    "adapt",
    "registered_methods",
]
