"""RankMe: the effective rank of a representation.

Garrido, Balestriero, Najman, LeCun, "RankMe: Assessing the downstream performance of
pretrained self-supervised representations by their rank", ICML 2023, Eq. (1).
"""

from __future__ import annotations

import math

import torch

#: The number of samples the paper computes RankMe on.
RANKME_SAMPLES = 25_600
#: The epsilon added to each normalised singular value (Eq. 1 of the paper).
RANKME_EPS = 1e-7


def rankme(
    features: torch.Tensor, *, max_samples: int = RANKME_SAMPLES, seed: int = 0, eps: float = RANKME_EPS
) -> float:
    """RankMe of ``features`` [N, D]: exp(-sum p_k log p_k), p_k = s_k / sum(s) + eps.

    ``s`` are the singular values of the feature matrix, computed in float64 on the features'
    device (MPS, which has no float64, falls back to the CPU). When N > ``max_samples`` a seeded
    random subset of rows is used (rows of an ImageFolder are sorted by class, so the first rows
    would not be representative). The value lies in [1, min(N, D)] up to ``eps``; features that
    are all zero or not finite give NaN, which a training monitor can log as is.
    """
    if features.ndim != 2:
        raise ValueError(f"rankme expects features of shape [N, D], got {tuple(features.shape)}")
    n = features.shape[0]
    if n == 0 or features.shape[1] == 0:
        raise ValueError("rankme needs at least one sample and one feature dimension")
    if n > max_samples:
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randperm(n, generator=gen)[:max_samples].to(features.device)
        features = features.index_select(0, rows)
    if features.device.type == "mps":
        features = features.cpu()
    x = features.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        return math.nan
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if not total > 0:
        return math.nan
    p = s / total + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))
