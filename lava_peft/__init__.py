"""lava-peft: parameter-efficient fine-tuning for language and vision models.

    import lava_peft as lp
    model = lp.adapt(model, lp.LavaConfig(r=8, alpha=16, target_modules="all-linear"))
"""

from ._version import __version__

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
from .methods import DeltaAdapter, DyLoraConfig, LavaConfig, LoraConfig, LowBitConfig, MosaConfig, SftConfig, ShiraConfig
from .model import AdaptedModel, adapt
from .train import Trainer, TrainingArguments, set_seed
from .methods.dense_delta import DenseDeltaConfig
from .methods.bottleneck import AdaptFormerConfig, HoulsbyConfig, PfeifferConfig, bi_adaptformer
from .combine import COMBINATION_TYPES, CombinationReport, FactorCodec, register_factor_codec
from .hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from .interop import export_peft, import_peft
from .config import TaskType
from .peft_api import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    PeftConfig,
    PeftModel,
    get_layer_status,
    get_model_status,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from . import diagnostics

__all__ = [
    "AdaptedLayer",
    "AdaptedModel",
    "AdapterConfig",
    "AdaptFormerConfig",
    "HoulsbyConfig",
    "PfeifferConfig",
    "bi_adaptformer",
    "AdapterFileError",
    "AdapterNameError",
    "BASE_NAME",
    "DeltaAdapter",
    "DyLoraConfig",
    "IncompatibleBaseModelError",
    "LavaConfig",
    "LavaConfigError",
    "LavaError",
    "LoraConfig",
    "LowBitConfig",
    "MosaConfig",
    "SftConfig",
    "ShiraConfig",
    "TargetModulesError",
    "Trainer",
    "TrainingArguments",
    "UnsupportedLayerError",
    "adapt",
    "registered_methods",
    "set_seed",
    # many adapters (issue 5)
    "COMBINATION_TYPES",
    "CombinationReport",
    "DenseDeltaConfig",
    "FactorCodec",
    "diagnostics",
    "export_peft",
    "hotswap_adapter",
    "import_peft",
    "prepare_model_for_compiled_hotswap",
    "register_factor_codec",
    # HF PEFT's names (issue 12, lava_peft/peft_api.py)
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "PeftConfig",
    "PeftModel",
    "TaskType",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "prepare_model_for_kbit_training",
    "set_peft_model_state_dict",
]


def __getattr__(name: str):
    """``lp.RankingAdapter`` / ``lp.RankingConfig`` without importing the ranking pipeline at start-up."""
    if name in ("RankingAdapter", "RankingConfig"):
        from . import ranking

        return getattr(ranking, name)
    raise AttributeError(f"module 'lava_peft' has no attribute {name!r}")
