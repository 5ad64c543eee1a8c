"""Contrastive losses: MarginNCE (InterCLR) and InfoNCE (MoCo) as one function.

References
----------
* InterCLR: Xie, Zhan, Liu, Ong, Loy, "Delving into Inter-Image Invariance for Unsupervised
  Visual Representations", arXiv 2008.11702 (IJCV 2022). The *MarginNCE* loss of the
  "decision boundary design" study: InfoNCE whose positive logit carries a margin, either a
  cosine (additive) margin ``cos(theta_p) - m`` (CosFace-style) or an arc (angular) margin
  ``cos(theta_p + m)`` (ArcFace-style). The released model uses the cosine margin m = -0.5 for
  the inter-image branch and m = 0 for the intra-image branch.
* MoCo: He et al., "Momentum Contrast for Unsupervised Visual Representation Learning",
  arXiv 1911.05722, Eq. (1): ``L_q = -log exp(q.k+/tau) / sum_{i=0..K} exp(q.k_i/tau)``.

MarginNCE for one query with positive cosine ``c_p`` and negative cosines ``c_1..c_M``::

    L = -log  exp(phi(c_p) / tau) / ( exp(phi(c_p) / tau) + sum_j exp(c_j / tau) )

    phi(c) = c - m                      (margin_type="additive", cosine margin)
    phi(c) = cos(arccos(c) + m)         (margin_type="angular",  arc margin)

A positive ``m`` makes the positive harder to satisfy (stricter decision boundary); the
InterCLR study found a *negative* margin (a looser boundary) better for inter-image pairs,
whose pseudo-label positives are noisy. With ``m = 0`` both reduce to InfoNCE (MoCo Eq. 1).

The angular form follows the released mmselfsup code (which follows ArcFace's reference
implementation) where ``theta + m`` leaves ``[0, pi]``, so that the positive logit stays
monotonic in ``c``:

* ``m > 0`` and ``theta >= pi - m``:  ``phi = c - m * sin(m)``
* ``m < 0`` and ``theta <= -m``:      ``phi = c + m * sin(m)``   (``m * sin(m) > 0``)

"Handled stably": ``c`` is clamped to ``[-1 + 1e-6, 1 - 1e-6]`` before ``arccos`` so neither the
value nor the gradient is ever NaN/inf (``d arccos/dc`` is unbounded at +-1); the price is a zero
gradient for cosines within 1e-6 of +-1. All arithmetic is done in float32 (bf16 inputs are
upcast; :func:`queue_cosines` and :func:`info_nce` switch autocast off, so the [B, 1 + K] logits are
float32 under bf16 autocast too), and the cross-entropy uses log-sum-exp.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, get_args

import torch

from .config.schema import MarginType

MARGIN_TYPES: tuple[str, ...] = get_args(MarginType)  # declared once, in the config schema
_ACOS_EPS = 1e-6


def margin_positive_logit(pos_cos: torch.Tensor, margin: float, margin_type: str = "additive") -> torch.Tensor:
    """``phi(c_p)``: the positive cosine with the MarginNCE margin applied (see module doc)."""
    if margin_type not in MARGIN_TYPES:
        raise ValueError(f"margin_type must be one of {MARGIN_TYPES}, got {margin_type!r}")
    c = pos_cos.float()
    if margin == 0.0:
        return c
    if margin_type == "additive":
        return c - margin
    # angular (arc) margin: cos(theta + m), theta = arccos(c)
    c = c.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS)
    phi = torch.cos(torch.acos(c) + margin)
    if margin > 0:
        # theta >= pi - m (c <= cos(pi - m)): cos(theta + m) would turn back up; go on linearly
        outside = c <= math.cos(math.pi - margin)
        fallback = c - margin * math.sin(margin)
    else:
        # theta <= -m (c >= cos(m)): cos(theta + m) would turn back down; go on linearly
        outside = c >= math.cos(margin)
        fallback = c + margin * math.sin(margin)
    return torch.where(outside, fallback, phi)


def margin_nce(
    pos_cos: torch.Tensor,
    neg_cos: torch.Tensor,
    temperature: float,
    margin: float = 0.0,
    margin_type: str = "additive",
    neg_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MarginNCE (InterCLR, decision-boundary design), averaged over the batch.

    Args:
        pos_cos: [B] cosine similarity of each query to its positive.
        neg_cos: [B, M] cosine similarity of each query to its negatives.
        temperature: tau.
        margin: m (additive: subtracted from the positive cosine; angular: added to its angle).
        margin_type: ``"additive"`` (cosine margin) or ``"angular"`` (arc margin).
        neg_valid: optional [B, M] bool; False entries are dropped from the denominator (used
            when a query has fewer admissible negatives than M).

    Returns:
        scalar float32 tensor: mean over B of ``-log softmax([phi(c_p), c_1..c_M] / tau)[0]``,
        i.e. cross-entropy with target 0 (MoCo Eq. 1 when m = 0).
    """
    pos = margin_positive_logit(pos_cos, margin, margin_type)  # [B]
    neg = neg_cos.float()  # [B, M]
    if neg_valid is not None:
        neg = neg.masked_fill(~neg_valid, float("-inf"))
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1) / temperature  # [B, 1+M]
    # cross-entropy with target 0 == logsumexp(logits) - logits[:, 0]
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def fp32(device: torch.device):
    """A region where autocast is off, so contrastive logits are float32 under any precision."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


def queue_cosines(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's positive and queue cosines, float32 under any autocast (bf16 inputs are upcast).

    Args: q [B, D], k [B, D], queue [K, D] (L2-normalised rows). Returns (l_pos [B], l_neg [B, K]):
    ``l_pos = q . k+`` and ``l_neg = q . k_i`` over the queue, the [B, 1 + K] logits times tau.
    """
    with fp32(q.device):
        qf = q.float()
        return (qf * k.float()).sum(dim=1), qf @ queue.float().t()


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    margin: float = 0.0,
    margin_type: str = "additive",
) -> torch.Tensor:
    """MoCo InfoNCE (He et al., arXiv 1911.05722, Eq. 1) through :func:`margin_nce`.

    Args:
        q: [B, D] L2-normalised queries (carry the gradient).
        k: [B, D] L2-normalised keys (positives; normally detached).
        queue: [K, D] L2-normalised negatives (detached).
        temperature: tau (MoCo v2: 0.2).
        margin: optional MarginNCE margin on the positive (InterCLR's intra branch uses 0).
    """
    pos, neg = queue_cosines(q, k, queue)  # [B], [B, K] float32
    with fp32(q.device):
        return margin_nce(pos, neg, temperature, margin, margin_type)


__all__ = ["MARGIN_TYPES", "fp32", "info_nce", "margin_nce", "margin_positive_logit", "queue_cosines"]
