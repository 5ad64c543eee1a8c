"""Backbones built by name (timm/torchvision style registry).

Parameter names stay torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean`` ...) so an
exported backbone loads with ``strict=True`` into ``torchvision.models.resnetXX()``. The
small-image stem (3x3 stride-1 ``conv1``, no max-pool; for 32-96 px inputs) keeps the same
names: only ``conv1.weight`` changes shape, from [64, 3, 7, 7] to [64, 3, 3, 3].
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn
import torchvision

from ..errors import UserError

BACKBONES: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


def apply_small_stem(model: torchvision.models.ResNet) -> torchvision.models.ResNet:
    """Replace conv1 by a 3x3 stride-1 conv and drop the max-pool (CIFAR-style stem)."""
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def torchvision_resnet(arch: str, small_stem: bool = False, num_classes: int = 1000) -> torchvision.models.ResNet:
    """The plain torchvision model matching an exported interclr backbone.

    ``torchvision_resnet("resnet18", small_stem=True).load_state_dict(exported, strict=False)``
    is the documented one-line helper for small-stem exports (``strict=True`` when ``fc`` is
    included in the file).
    """
    if arch not in BACKBONES:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(BACKBONES)}")
    model = BACKBONES[arch](weights=None, num_classes=num_classes)
    if small_stem:
        apply_small_stem(model)
    return model


def build_backbone(arch: str, small_stem: bool = False) -> tuple[nn.Module, int]:
    """A ResNet whose forward returns pooled features [B, C] (``fc`` is an Identity)."""
    model = torchvision_resnet(arch, small_stem)
    dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, dim
