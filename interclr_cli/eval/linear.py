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


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """How many rows of ``logits`` [N, C] have their target [N] among the top k, for every k:
    a float tensor [len(ks)] on the logits' device (no host sync). A k larger than C counts as C."""
    kmax = max(1, min(max(ks), logits.shape[1]))
    hit = logits.topk(kmax, dim=1).indices == targets.to(logits.device).view(-1, 1)  # [N, kmax]
    hit = hit.cumsum(dim=1) > 0  # [N, kmax]: target within the first j + 1
    return torch.stack([hit[:, min(k, kmax) - 1].sum() for k in ks]).float()


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent for every k (k larger than the number of classes counts as all
    classes; NaN for no rows)."""
    if logits.shape[0] == 0:
        return {int(k): math.nan for k in ks}
    counts = topk_correct(logits, targets, ks).tolist()
    return {int(k): 100.0 * c / logits.shape[0] for k, c in zip(ks, counts)}


@torch.no_grad()
def score_classifier(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, chunk: int = 4096
) -> dict:
    """``{"val_loss", "top1", "top5"}`` (mean cross-entropy, percent) of the logits ``fn(x)`` for
    labels ``y`` [N], computed in chunks of ``chunk`` rows on x's device with one host sync."""
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)  # loss, top-1 hits, top-5 hits
    for s in range(0, x.shape[0], chunk):
        logits = fn(x[s : s + chunk].float()).float()
        yb = y[s : s + chunk]
        sums[0] += F.cross_entropy(logits, yb, reduction="sum").double()
        sums[1:] += topk_correct(logits, yb, (1, 5)).double()
    n = max(x.shape[0], 1)
    loss, top1, top5 = sums.tolist()
    return {"val_loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def _check_inputs(train_x, train_y, val_x, val_y, num_classes: int, epochs: int, batch_size: int) -> None:
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


def _epoch(
    model: nn.Linear, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int
) -> torch.Tensor:
    """One epoch over (x, y) in the order of a permutation seeded with ``seed``; the summed loss."""
    model.train()
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed)).to(x.device)
    total = torch.zeros((), device=x.device)
    for start in range(0, x.shape[0], batch_size):
        idx = order[start : start + batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach() * idx.shape[0]
    return total


def train_linear_on_features(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    *,
    epochs: int,
    lr_at: Callable[[int], float],
    momentum: float,
    weight_decay: float,
    batch_size: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress_cb: Callable[[dict], None] | None = None,
) -> tuple[nn.Linear, dict]:
    """Train ``nn.Linear(D, num_classes)`` on cached features [N, D] with SGD; evaluate after each epoch.

    Initialisation follows MoCo's ``main_lincls.py`` (weight ~ N(0, 0.01), bias 0). Each epoch
    visits the training set in the order of a permutation drawn from a generator seeded with
    ``seed + epoch``, in mini-batches of ``batch_size`` (the last one may be smaller), at the
    learning rate ``lr_at(epoch)`` (0-based epochs; the caller passes the training loop's
    schedule). Everything runs on ``device`` and the global RNG is left alone, so a seed
    reproduces the result on one device.

    ``progress_cb`` gets each history entry. Returns the layer (on ``device``, eval mode) and
    ``{"top1", "top5"`` (last epoch, percent), ``"best_top1", "best_epoch", "history"}``, where
    history has one ``{"epoch", "lr", "train_loss", "val_loss", "top1", "top5"}`` per epoch.
    """
    _check_inputs(train_x, train_y, val_x, val_y, num_classes, epochs, batch_size)
    device = torch.device(device)
    xtr, ytr = train_x.to(device=device, dtype=torch.float32), train_y.to(device=device, dtype=torch.long)
    xva, yva = val_x.to(device=device, dtype=torch.float32), val_y.to(device=device, dtype=torch.long)
    model = nn.Linear(xtr.shape[1], num_classes)
    with torch.no_grad():
        model.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(seed))
        model.bias.zero_()
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr_at(0), momentum=momentum, weight_decay=weight_decay)
    history: list[dict] = []
    for epoch in range(epochs):
        epoch_lr = lr_at(epoch)
        for group in opt.param_groups:
            group["lr"] = epoch_lr
        total = _epoch(model, opt, xtr, ytr, batch_size, seed + epoch)
        train_loss = float(total) / xtr.shape[0]
        if not math.isfinite(train_loss):
            raise WorkError(
                f"linear eval diverged: the training loss is not finite in epoch {epoch + 1}; lower optim.lr"
            )
        model.eval()
        entry = {
            "epoch": epoch + 1,
            "lr": epoch_lr,
            "train_loss": train_loss,
            **score_classifier(model, xva, yva, max(batch_size, 1024)),
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
