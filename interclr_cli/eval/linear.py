"""Linear classification on frozen, pre-extracted features (the linear-evaluation protocol).

The protocol of MoCo (He et al., CVPR 2020, Sec. 4.1) and InterCLR (Xie et al., IJCV 2022):
a single linear layer trained with SGD on top of a frozen backbone. Here the features are
already extracted (no augmentation), which makes an epoch a few matrix products.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError, WorkError


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent for every k (k larger than the number of classes counts as all classes)."""
    if logits.shape[0] == 0:
        return {int(k): math.nan for k in ks}
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1, largest=True, sorted=True).indices
    hit = top == targets.to(top.device).view(-1, 1)
    return {int(k): 100.0 * float(hit[:, : min(k, kmax)].any(dim=1).float().mean()) for k in ks}


def _lr_at(epoch: int, *, lr: float, epochs: int, schedule: str, milestones: Sequence[int], gamma: float) -> float:
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return lr * gamma ** sum(1 for m in milestones if epoch >= m)


@torch.no_grad()
def _evaluate(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, dict[int, float]]:
    hits = {1: 0.0, 5: 0.0}
    loss = 0.0
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logits = model(xb)
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        for k, acc in topk_accuracy(logits, yb, (1, 5)).items():
            hits[k] += acc * xb.shape[0]
    n = max(x.shape[0], 1)
    return loss / n, {k: v / n for k, v in hits.items()}


def train_linear_on_features(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    schedule: str = "step",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress_cb: Callable[[dict], None] | None = None,
) -> tuple[nn.Linear, dict]:
    """Train ``nn.Linear(D, num_classes)`` on cached features with SGD; evaluate after each epoch.

    Initialisation follows MoCo's ``main_lincls.py`` (weight ~ N(0, 0.01), bias 0). Each epoch
    visits the training set in the order of a permutation drawn from a generator seeded with
    ``seed + epoch``, in mini-batches of ``batch_size`` (the last one may be smaller). The learning
    rate is set per epoch: ``"step"`` multiplies it by ``gamma`` at every milestone epoch (0-based
    epochs, as MoCo's 60/80 of 100), ``"cosine"`` decays it to 0 over ``epochs``. Everything runs
    on ``device`` and the global RNG is left alone, so a seed reproduces the result on one device.

    ``progress_cb`` gets each history entry. Returns the layer (on ``device``, eval mode) and
    ``{"top1", "top5"`` (last epoch, percent), ``"best_top1", "best_epoch", "history"}``, where
    history has one ``{"epoch", "lr", "train_loss", "val_loss", "top1", "top5"}`` per epoch.
    """
    if schedule not in ("step", "cosine"):
        raise UserError(f"unknown learning-rate schedule {schedule!r}; use 'step' or 'cosine'")
    if train_x.ndim != 2 or val_x.ndim != 2 or train_x.shape[1] != val_x.shape[1]:
        raise UserError(
            f"linear eval: feature shapes {tuple(train_x.shape)} and {tuple(val_x.shape)} do not match; "
            "extract both splits with the same checkpoint"
        )
    if train_x.shape[0] != train_y.shape[0] or val_x.shape[0] != val_y.shape[0]:
        raise UserError("linear eval: the number of features and labels differ; re-extract the features")
    if train_x.shape[0] == 0 or val_x.shape[0] == 0:
        raise UserError("linear eval: the training or validation set is empty; check the data folders")
    for name, y in (("training", train_y), ("validation", val_y)):
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise UserError(
                f"linear eval: {name} labels range over {int(y.min())}..{int(y.max())} but num_classes is "
                f"{num_classes}; check that both splits have the same class folders"
            )
    if epochs < 1 or batch_size < 1:
        raise UserError(f"linear eval: epochs and batch size must be positive, got {epochs} and {batch_size}")

    device = torch.device(device)
    xtr = train_x.to(device=device, dtype=torch.float32)
    ytr = train_y.to(device=device, dtype=torch.long)
    xva = val_x.to(device=device, dtype=torch.float32)
    yva = val_y.to(device=device, dtype=torch.long)

    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(xtr.shape[1], num_classes)
    with torch.no_grad():
        model.weight.normal_(0.0, 0.01, generator=gen)
        model.bias.zero_()
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    n = xtr.shape[0]
    history: list[dict] = []
    for epoch in range(epochs):
        epoch_lr = _lr_at(epoch, lr=lr, epochs=epochs, schedule=schedule, milestones=milestones, gamma=gamma)
        for group in opt.param_groups:
            group["lr"] = epoch_lr
        model.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).to(device)
        total_loss = torch.zeros((), device=device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.detach() * idx.shape[0]
        if not bool(torch.isfinite(total_loss)):
            raise WorkError(f"linear eval diverged: the training loss is not finite in epoch {epoch + 1}; lower --lr")
        model.eval()
        val_loss, acc = _evaluate(model, xva, yva, max(batch_size, 1024))
        entry = {
            "epoch": epoch + 1,
            "lr": epoch_lr,
            "train_loss": float(total_loss) / n,
            "val_loss": val_loss,
            "top1": acc[1],
            "top5": acc[5],
        }
        history.append(entry)
        if progress_cb is not None:
            progress_cb(entry)
    best = max(history, key=lambda e: e["top1"])
    return model, {
        "top1": history[-1]["top1"],
        "top5": history[-1]["top5"],
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
        "history": history,
    }
