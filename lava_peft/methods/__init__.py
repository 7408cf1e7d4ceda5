"""One module per method: its config and its adapter math. Importing registers them."""

from .base import DeltaAdapter, ModuleAdapter
from .bottleneck import AdaptFormerConfig, BottleneckAdapter, HoulsbyConfig, PfeifferConfig, bi_adaptformer
from .dense_delta import DenseDeltaAdapter, DenseDeltaConfig
from .dylora import DyLoraAdapter, DyLoraConfig
from .lava import LavaAdapter, LavaConfig
from .lora import LoraAdapter, LoraConfig
from .lowbit import LowBitAdapter, LowBitConfig
from .mosa import MosaAdapter, MosaConfig
from .shira import ShiraAdapter, ShiraConfig
from .sparse import SparseDeltaAdapter
from .sft import SftAdapter, SftConfig

__all__ = ["DeltaAdapter", "DenseDeltaAdapter", "DenseDeltaConfig", "DyLoraAdapter", "DyLoraConfig", "LavaAdapter", "LavaConfig", "LoraAdapter", "LoraConfig", "LowBitAdapter", "LowBitConfig", "MosaAdapter", "MosaConfig",
           "ShiraAdapter", "ShiraConfig", "SftAdapter", "SftConfig",
           "SparseDeltaAdapter", "ModuleAdapter", "AdaptFormerConfig", "BottleneckAdapter", "HoulsbyConfig",
           "PfeifferConfig", "bi_adaptformer"]
