"""CLD: cross-level instance-group discrimination, an add-on part for mocov2, npid and interclr.

Wang, Liu, Yu, "Unsupervised Feature Learning by Cross-Level Instance-Group Discrimination", CVPR
2021 (arXiv 2008.03813); official code frank-xwang/CLD-UnsupervisedLearning (``KMeans`` in
``spectral_clustering.py``, ``grouping`` in ``main_imagenet_moco_cld.py``, ``NormedLinear``).

A group head f_G forks from the instance head's hidden layer (the paper's NormMLP: the shared
Linear-ReLU of the projection head, then an instance head and a group head side by side). For the
two views x, x' of a batch (B images; all-gathered over the W ranks, so W*B rows):

    g  = normalize(f_G(h(x)))                          [WB, d]   group features, view 1 (gradient)
    g' = normalize(f_G(h(x')))                         [WB, d]   view 2 (gradient)
    Gamma', M' = kmeans(g', K, iters)                  [WB], [K, d]   Lloyd on view 2's features:
        M'_0 = g'[:K] (the official initialisation), each iteration: Gamma' = argmin_j ||g' - M'_j||^2,
        M'_j = mean of its members (an empty cluster's centroid is 0, as the official code)
    L_CLD = 1/2 [ CE(g  M'^T / tau_G, Gamma') + CE(g' M^T / tau_G, Gamma) ]   (the paper's Eq. 6,
        symmetrised: each view's features classified into the other view's groups)
    L = L_method + lambda * L_CLD

Centroids are treated as the official code treats them: the assignments are discrete (no
gradient) and the centroids are the means of the members' features, so the gradient flows into
both the features and, through the means, the other view's features. All of it in float32 under
any autocast. Several ranks: the group features are all-gathered *with* gradient (a sum
all-reduce of a zero-padded slot per rank), every rank runs the same deterministic k-means on
the same global batch and gets the same L_CLD, and with DDP's gradient averaging the step equals
one process on the global batch. K must not exceed the global batch (refused with a one-line
error); the official ImageNet script runs K = 120 on 64 images per GPU, which its k-means
silently caps at 64 initial centroids per GPU; here K = 120 clusters the 512 gathered images.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config.schema import Config
from ..errors import UserError
from ..losses import fp32
from ..runtime import dist


class NormedLinear(nn.Module):
    """``normalize(x) @ normalize(W, columns)`` (no bias): cosines to d learned directions."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        w = torch.empty(in_dim, out_dim).uniform_(-1, 1)
        self.weight = nn.Parameter(F.normalize(w, dim=0))  # [in, out], unit columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)  # [B, out]


def cluster_means(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Centroids [K, D]: the mean of the rows of ``x`` [B, D] with each label (0 if none);
    differentiable in ``x``."""
    one_hot = x.new_zeros(x.shape[0], k).scatter_(1, labels.unsqueeze(1), 1.0)  # [B, K] (F.one_hot syncs on CUDA)
    counts = one_hot.sum(0).clamp_min(1.0)  # [K]
    return (one_hot.t() @ x) / counts.unsqueeze(1)


def batch_kmeans(x: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the rows of ``x`` [B, D] from the first K rows; (labels [B] of the last
    assignment, centroids [K, D] = the means of that assignment, with gradient to ``x``)."""
    if k > x.shape[0]:
        raise ValueError(f"k-means with K = {k} needs at least K rows, got {x.shape[0]}")
    with torch.no_grad():
        xd = x.detach()
        c = xd[:k].clone()  # [K, D]
        labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for _ in range(max(1, iters)):
            d = ((xd.unsqueeze(1) - c.unsqueeze(0)) ** 2).sum(-1)  # [B, K] squared distances
            labels = d.argmin(dim=1)  # [B]   first minimum on ties
            c = cluster_means(xd, labels, k)
    return labels, cluster_means(x, labels, k)


def cross_level_loss(g1: torch.Tensor, g2: torch.Tensor, k: int, iters: int, temperature: float):
    """L_CLD of unit group features ``g1``, ``g2`` [B, d] (module doc) -> (loss, accuracy of
    view 1's nearest view-2 centroid against view 2's grouping), both scalar tensors."""
    lab1, c1 = batch_kmeans(g1, k, iters)
    lab2, c2 = batch_kmeans(g2, k, iters)
    a12 = g1 @ c2.t() / temperature  # [B, K]
    a21 = g2 @ c1.t() / temperature  # [B, K]
    loss = 0.5 * (F.cross_entropy(a12, lab2) + F.cross_entropy(a21, lab1))
    acc = (a12.detach().argmax(1) == lab2).float().mean()
    return loss, acc


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """``t`` [B, ...] of every rank concatenated in rank order [W*B, ...], with gradient (each rank
    writes its slot of a zero tensor, then a sum all-reduce whose backward sums the gradients)."""
    if not dist.is_dist() or dist.world_size() == 1:
        return t
    b, r = t.shape[0], dist.rank()
    slots = torch.arange(r * b, (r + 1) * b, device=t.device)
    full = t.new_zeros((dist.world_size() * b,) + tuple(t.shape[1:])).index_copy(0, slots, t)
    return dist.all_reduce_sum_with_grad(full)


class CLDPart(nn.Module):
    """The group head ``head`` and L_CLD (module doc); the method calls :meth:`encode` for both
    views and adds ``weight * loss`` of :meth:`loss`."""

    def __init__(self, cfg: Config, hidden_dim: int):
        super().__init__()
        c = cfg.method.cld
        self.weight, self.temperature = c.weight, c.temperature
        self.num_clusters, self.iters = c.num_clusters, c.kmeans_iters
        self.head = NormedLinear(hidden_dim, c.dim) if c.normlinear else nn.Linear(hidden_dim, c.dim)

    def encode(self, encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(instance projection [B, D] as ``encoder(x)``, group features [B, d], not normalised)
        from one pass: backbone, the head's Linear-ReLU, then the instance and group layers."""
        h = encoder.head[1](encoder.head[0](encoder.backbone(x)))  # [B, hidden]
        return encoder.head[2](h), self.head(h)

    def loss(self, g1: torch.Tensor, g2: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_CLD in float32 over the all-gathered batch -> (loss, logs ``loss_cld``, ``cld_acc``)."""
        with fp32(g1.device):
            f1 = gather_with_grad(F.normalize(g1.float(), dim=1))  # [WB, d]
            f2 = gather_with_grad(F.normalize(g2.float(), dim=1))  # [WB, d]
            loss, acc = cross_level_loss(f1, f2, self.num_clusters, self.iters, self.temperature)
        return loss, {"loss_cld": loss.detach(), "cld_acc": acc}


def global_batch(cfg: Config) -> int:
    """Images per step over all ranks (``train.global_batch``, else per-process batch x ranks)."""
    gb = cfg.train.global_batch
    return gb if gb > 0 else cfg.train.batch_size * dist.world_size()


def build_cld(cfg: Config, encoder: nn.Module) -> Optional[CLDPart]:
    """The CLD part for ``encoder``'s head, or None when ``method.cld.weight`` is 0. K above the
    global batch (the k-means needs K rows) is refused."""
    c = cfg.method.cld
    if c.weight == 0:
        return None
    if cfg.method.name not in ("mocov2", "npid", "interclr"):
        raise UserError(f"method.cld.weight applies to mocov2, npid and interclr, not {cfg.method.name}; set it to 0")
    gb = global_batch(cfg)
    if c.num_clusters > gb:
        raise UserError(
            f"method.cld.num_clusters={c.num_clusters} exceeds the global batch ({gb} images); "
            f"lower it to at most {gb} or raise train.batch_size"
        )
    if c.num_clusters < 1 or c.kmeans_iters < 1 or c.temperature <= 0:
        raise UserError("method.cld needs num_clusters >= 1, kmeans_iters >= 1 and temperature > 0")
    return CLDPart(cfg, encoder.head[0].out_features)


__all__ = ["CLDPart", "NormedLinear", "batch_kmeans", "build_cld", "cross_level_loss", "cluster_means"]
