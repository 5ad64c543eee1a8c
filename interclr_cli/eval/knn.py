"""Weighted k-nearest-neighbour classification of frozen features.

The protocol of Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination" (NPID), CVPR 2018, Sec. 3.4, as used by DINO (Caron et al., ICCV 2021): cosine
similarity, the k most similar training samples vote for their class with weight exp(sim / T).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import UserError


def _check_inputs(train_feats, train_labels, test_feats, ks, temperature) -> list[int]:
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError("knn expects features of shape [N, D]")
    if train_labels.ndim != 1 or train_labels.shape[0] != train_feats.shape[0]:
        raise UserError(
            f"kNN: {train_feats.shape[0]} training features but {tuple(train_labels.shape)} labels; "
            "extract features and labels from the same dataset"
        )
    if train_feats.shape[1] != test_feats.shape[1]:
        raise UserError(
            f"kNN: training features have dimension {train_feats.shape[1]} but test features "
            f"{test_feats.shape[1]}; extract both with the same checkpoint"
        )
    if train_feats.shape[0] == 0:
        raise UserError("kNN: the training set is empty; point --train-dir at a folder with images")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise UserError(f"kNN: k must be positive integers, got {list(ks)}")
    if ks[-1] > train_feats.shape[0]:
        raise UserError(f"kNN: k={ks[-1]} exceeds the {train_feats.shape[0]} training samples; use a smaller --k")
    if not temperature > 0:
        raise UserError(f"kNN: the temperature must be positive, got {temperature}")
    return ks


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    ks: Sequence[int],
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 256,
) -> dict[int, torch.Tensor]:
    """Predicted class (int64, on the CPU) of every test row for every k in ``ks``.

    Features are L2-normalised here (the inputs are not modified). The work is done on
    ``train_feats``' device, ``chunk_size`` test rows at a time, so at most a
    [chunk_size, N_train] similarity block is held; a single top-max(ks) search per chunk serves
    every k. Weights are exp((sim - sim_max) / T), which leaves the vote of NPID/DINO unchanged
    but cannot overflow for small T. Ties between classes go to the smaller class index.
    """
    ks = _check_inputs(train_feats, train_labels, test_feats, ks, temperature)
    device = train_feats.device
    labels = train_labels.to(device=device, dtype=torch.long)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    elif int(labels.max()) >= num_classes or int(labels.min()) < 0:
        raise UserError(
            f"kNN: training labels must lie in [0, {num_classes}); got {int(labels.min())}..{int(labels.max())}"
        )
    # Normalising by the inverse norms after the product avoids a normalised copy of the train set.
    train_inv_norm = 1.0 / torch.linalg.vector_norm(train_feats, dim=1, dtype=torch.float32).clamp_min(1e-12)
    kmax = ks[-1]
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, test_feats.shape[0], chunk_size):
        q = test_feats[start : start + chunk_size].to(device=device, dtype=torch.float32)
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim = (q.to(train_feats.dtype) @ train_feats.T).float() * train_inv_norm
        top_sim, top_idx = sim.topk(kmax, dim=1, largest=True, sorted=True)
        del sim
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
        top_labels = labels[top_idx]
        for k in ks:
            votes = torch.zeros(q.shape[0], num_classes, device=device, dtype=torch.float32)
            votes.scatter_add_(1, top_labels[:, :k], weights[:, :k])
            out[k].append(votes.argmax(dim=1).cpu())
    empty = torch.zeros(0, dtype=torch.long)
    return {k: torch.cat(v) if v else empty for k, v in out.items()}


def knn_top1(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int],
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 256,
) -> dict[int, float]:
    """Top-1 accuracy in percent of :func:`knn_classify` for every k in ``ks``."""
    if test_labels.shape[0] != test_feats.shape[0]:
        raise UserError(
            f"kNN: {test_feats.shape[0]} test features but {test_labels.shape[0]} labels; "
            "extract features and labels from the same dataset"
        )
    if test_feats.shape[0] == 0:
        raise UserError("kNN: the test set is empty; point --val-dir at a folder with images")
    preds = knn_classify(train_feats, train_labels, test_feats, ks, temperature, num_classes, chunk_size)
    target = test_labels.cpu().long()
    return {k: 100.0 * float((p == target).float().mean()) for k, p in preds.items()}
