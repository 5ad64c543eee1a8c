from .backbones import BACKBONES, FEATURE_DIMS, build_backbone, torchvision_resnet
from .heads import MoCoV2Head

__all__ = ["BACKBONES", "FEATURE_DIMS", "build_backbone", "torchvision_resnet", "MoCoV2Head", "Encoder"]

import torch.nn as nn


class Encoder(nn.Module):
    """Backbone followed by a projection head. ``backbone`` keeps torchvision's names."""

    def __init__(self, arch: str, small_stem: bool, hidden: int = 0, embed_dim: int = 128):
        super().__init__()
        self.backbone, dim = build_backbone(arch, small_stem)
        self.head = MoCoV2Head(dim, hidden or dim, embed_dim)
        self.feature_dim = dim

    def forward(self, x):
        return self.head(self.backbone(x))
