"""One module per method: its config and its adapter math. Importing registers them."""

from .base import DeltaAdapter
from .dense_delta import DenseDeltaAdapter, DenseDeltaConfig
from .lava import LavaAdapter, LavaConfig
from .lora import LoraAdapter, LoraConfig
from .shira import ShiraAdapter, ShiraConfig, SparseDeltaAdapter

__all__ = ["DeltaAdapter", "DenseDeltaAdapter", "DenseDeltaConfig", "LavaAdapter", "LavaConfig", "LoraAdapter", "LoraConfig",
           "ShiraAdapter", "ShiraConfig", "SparseDeltaAdapter"]
