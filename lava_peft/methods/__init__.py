"""One module per method: its config and its adapter math. Importing registers them."""

from .base import DeltaAdapter
from .lava import LavaAdapter, LavaConfig
from .lora import LoraAdapter, LoraConfig

__all__ = ["DeltaAdapter", "LavaAdapter", "LavaConfig", "LoraAdapter", "LoraConfig"]
