"""Turn uint8 image arrays into normalised float tensors for ImageNet-pretrained conv nets.

No torchvision: resizing is ``torch.nn.functional.interpolate`` (bilinear).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "to_image_tensor"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_image_tensor(
    images,
    size: int | tuple[int, int] | None = 64,
    channels: int = 3,
    normalize: bool = True,
) -> torch.Tensor:
    """``uint8`` images to a float tensor ``[N, channels, H, W]``.

    ``images`` is a numpy array or tensor shaped ``[N, H, W]`` (grey), ``[N, H, W, C]``
    (HWC, e.g. PIL/sklearn photos) or a single ``[H, W]`` / ``[H, W, 3|4]`` image.  Values
    are scaled to [0, 1]; grey images are repeated to ``channels``; ``size`` (an int
    for square output, or ``(H, W)``; None keeps the size) resizes bilinearly, with
    antialiasing when shrinking; ``normalize`` applies ImageNet mean/std (3 channels only).
    """
    x = images if isinstance(images, torch.Tensor) else torch.tensor(np.asarray(images))
    if x.dim() == 2 or (x.dim() == 3 and x.shape[-1] in (3, 4)):
        x = x.unsqueeze(0)  # one grey [H, W] or colour [H, W, 3|4] image
    if x.dim() == 3:
        x = x.unsqueeze(1)  # [N, 1, H, W]
    elif x.dim() == 4:
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
    else:
        raise ValueError(f"expected [N,H,W], [N,H,W,C], [H,W] or [H,W,C] images, got shape {tuple(x.shape)}")
    x = x[:, :3].float().div_(255.0)
    if x.shape[1] != channels:
        if x.shape[1] != 1:
            raise ValueError(f"cannot turn {x.shape[1]}-channel images into {channels} channels")
        x = x.expand(-1, channels, -1, -1)
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if hw != tuple(x.shape[-2:]):
            shrink = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
            x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=shrink)
    if normalize:
        if channels != 3:
            raise ValueError("ImageNet normalisation needs channels=3")
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x.contiguous()
