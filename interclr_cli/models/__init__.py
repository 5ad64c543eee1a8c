"""Networks: torchvision ResNet backbones (small-image stem option), the MoCo v2 projection head,
the 1x1-output convolution fast path, and :class:`Encoder` (backbone + head)."""

from .backbones import BACKBONES, FEATURE_DIMS, build_backbone, torchvision_resnet
from .fastconv import PointOutputConv2d, use_point_output_convs
from .heads import MoCoV2Head

__all__ = [
    "BACKBONES",
    "FEATURE_DIMS",
    "build_backbone",
    "torchvision_resnet",
    "MoCoV2Head",
    "Encoder",
    "PointOutputConv2d",
    "use_point_output_convs",
]

import torch.nn as nn


class Encoder(nn.Module):
    """Backbone followed by a projection head. ``backbone`` keeps torchvision's names.

    Its convolutions take the exact 1x1-output fast path of :mod:`.fastconv` (small images)."""

    def __init__(self, arch: str, small_stem: bool, hidden: int = 0, embed_dim: int = 128):
        super().__init__()
        self.backbone, dim = build_backbone(arch, small_stem)
        use_point_output_convs(self.backbone)
        self.head = MoCoV2Head(dim, hidden or dim, embed_dim)
        self.feature_dim = dim

    def forward(self, x):
        """Images [B, 3, H, W] -> projections [B, embed_dim] (not normalised)."""
        return self.head(self.backbone(x))
