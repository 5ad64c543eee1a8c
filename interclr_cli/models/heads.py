"""Projection heads."""

from __future__ import annotations

import torch.nn as nn


class MoCoV2Head(nn.Sequential):
    """MoCo v2 projection head: Linear(in, hidden) - ReLU - Linear(hidden, out).

    Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv 2003.04297, Sec. 2.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 128):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
