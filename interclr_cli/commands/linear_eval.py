"""`interclr linear-eval`: a linear classifier on the frozen backbone's pooled features.

Two paths, the same protocol otherwise (He et al., "Momentum Contrast", CVPR 2020, Sec. 4.1):

- ``augmented`` (default): every step loads a batch with the training augmentation, runs the
  frozen backbone (eval mode, ``no_grad``) and updates the linear layer; the step schedule and
  the learning rate follow ``optim.*`` per iteration (:func:`~interclr_cli.training.optim.lr_factor`), in the one training loop
  (:class:`~interclr_cli.training.loop.TrainLoop`).
- ``cached-features`` (``--cached-features``): the frozen features of the training set are
  extracted once (centre crop, plus ``eval.cached_aug_copies`` augmented copies) and the layer is
  trained on them by :func:`~interclr_cli.eval.linear.train_linear_on_features`; an epoch then visits
  every copy, and the learning rate follows the same schedule, evaluated once per epoch.

Validation features never change (frozen backbone, deterministic transform), so both paths
extract them once and score the layer on them after every epoch.

Distributed (torchrun/srun): ``train.batch_size`` is per process and the learning rate follows the
global batch (:func:`~interclr_cli.training.optim.global_lr`). Feature extraction is
sharded across the processes and gathered in dataset order. The augmented path gives each process
its slice of every global batch (:class:`~interclr_cli.data.EpochBatchSampler`) and averages the
layer's gradients with DistributedDataParallel, so the layer ends as after one process on the same
global batch (up to the order of float sums). The cached-features path trains the layer on the
gathered features, on the global batch, identically on every process (an epoch is a few matrix
products) and keeps rank 0's copy. Rank 0 alone writes files and shows progress.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config.schema import Config
from ..data import linear_train_transform
from ..data.sources import FileIndex
from ..errors import UserError
from ..eval.linear import score_classifier, train_linear_on_features
from ..runtime import dist
from ..runtime.ddp import ddp_module
from ..runtime.device import autocast, memory_format, process_device
from ..runtime.progress import Reporter
from ..runtime.seed import seed_everything
from ..training.autochoice import channels_last_on
from ..training.features import extract_with_config
from ..training.loop import Position, StepTask, TrainLoop
from ..training.optim import build_optimizer, global_lr, lr_factor
from ..training.rundir import MetricsLog, file_log
from .common import (
    close_run,
    labelled_splits,
    open_run,
    prepare_backbone,
    refuse_early,
    resolve_config,
    supervised_loader,
)
from .loading import backbone_fingerprint, load_backbone, save_classifier

log = logging.getLogger("interclr")


def new_linear(dim: int, num_classes: int, seed: int) -> nn.Linear:
    """MoCo's initialisation (weight ~ N(0, 0.01), bias 0), from a seeded generator."""
    fc = nn.Linear(dim, num_classes)
    with torch.no_grad():
        fc.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(seed))
        fc.bias.zero_()
    return fc


class LinearTask(StepTask):
    """One step of the augmented path: frozen backbone features (eval mode, no gradient), the
    linear layer's cross-entropy (through DDP when distributed), the validation score per epoch."""

    epoch_name = "linear epoch"
    label = "linear-eval"

    def __init__(self, cfg: Config, backbone: nn.Module, fc: nn.Linear, head: nn.Module, val_x, val_y, device):
        self.cfg, self.backbone, self.fc, self.head = cfg, backbone, fc, head
        self.val_x, self.val_y, self.device = val_x, val_y, device
        self.fmt = memory_format(channels_last_on(cfg))
        self.history: list[dict] = []

    def on_epoch_start(self, epoch: int) -> None:
        self.fc.train()

    def forward(self, batch: dict, pos: Position):
        x = batch["image"].to(self.device, non_blocking=True).to(memory_format=self.fmt)
        y = batch["label"].to(self.device, non_blocking=True)
        with torch.no_grad(), autocast(self.device, self.cfg.train.precision):
            feats = self.backbone(x)
        return F.cross_entropy(self.head(feats.float()), y), {}

    def parameters(self):
        return self.fc.parameters()

    def end_epoch(self, record: dict, last: bool) -> tuple[dict, str]:
        self.fc.eval()
        scores = score_classifier(self.fc, self.val_x, self.val_y)
        self.history.append(
            {
                "epoch": record["epoch"],
                "lr": record["lr"],
                "train_loss": record["loss"],
                **scores,
                "seconds": record["seconds"],
                "img_per_s": record["img_per_s"],
                "skipped": record["skipped"],
            }
        )
        return scores, f"val top-1 {scores['top1']:.2f}  top-5 {scores['top5']:.2f}"


def _train_augmented(
    backbone, train_index, val_x, val_y, num_classes, cfg: Config, device, reporter, metrics
) -> tuple[nn.Linear, list[dict]]:
    fc = new_linear(val_x.shape[1], num_classes, cfg.seed).to(device)
    _, lr0 = global_lr(cfg.optim, cfg.train.batch_size, dist.world_size())
    optimizer = build_optimizer(cfg.optim, [{"params": list(fc.parameters())}], lr0)
    head = ddp_module(fc, device)  # training steps go through the wrapper, scoring through fc
    loader, sampler = supervised_loader(train_index, cfg, drop_last=False)
    task = LinearTask(cfg, backbone, fc, head, val_x, val_y, device)
    TrainLoop(
        cfg, task, optimizer, loader, sampler, device=device, metrics=metrics, reporter=reporter, ckpt_dir=None
    ).run(Position())
    return fc.eval(), task.history


def _cached_features(backbone, train_index, cfg: Config, device, reporter) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre-crop features of the training set plus ``eval.cached_aug_copies`` augmented copies."""
    (tx,), ty = extract_with_config(backbone, train_index, cfg, device, reporter, "train features")
    xs, ys = [tx], [ty]
    for c in range(1, cfg.eval.cached_aug_copies + 1):
        # copy c is a function of (seed, c, image), whichever rank or worker loads the image
        (ax,), ay = extract_with_config(
            backbone,
            train_index,
            cfg,
            device,
            reporter,
            f"augmented copy {c}",
            transform=linear_train_transform(cfg.data),
            aug_seed=cfg.seed * 1000 + c,
        )
        xs.append(ax)
        ys.append(ay)
    return torch.cat(xs), torch.cat(ys).to(device)


def _train_cached(
    backbone, train_index, val_x, val_y, num_classes, cfg: Config, device, reporter, metrics
) -> tuple[nn.Linear, list[dict]]:
    train_x, train_y = _cached_features(backbone, train_index, cfg, device, reporter)
    # every rank holds every feature: each trains on the global batch
    batch, lr = global_lr(cfg.optim, cfg.train.batch_size, dist.world_size())
    epochs = cfg.train.epochs
    task = reporter.task("linear (cached features)", total=epochs)

    def lr_at(epoch: int) -> float:  # the training loop's schedule, one step per epoch
        return lr * lr_factor(cfg.optim, epoch, 1, epochs)

    def progress(entry: dict) -> None:
        metrics.write({"type": "epoch", **entry})
        reporter.update(task, advance=1, info=f"loss {entry['train_loss']:.4f} top-1 {entry['top1']:.2f}")

    fc, res = train_linear_on_features(
        train_x,
        train_y,
        val_x,
        val_y,
        num_classes,
        epochs=epochs,
        lr_at=lr_at,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        batch_size=batch,
        seed=cfg.seed,
        device=device,
        progress_cb=progress,
    )
    reporter.finish(task)
    for t in (fc.weight, fc.bias):  # rank 0's layer (GPU kernels need not be bit-reproducible)
        dist.broadcast_(t.data, 0)
    return fc.eval(), res["history"]


def linear_probe(
    backbone: nn.Module,
    train_index: FileIndex,
    val_index: FileIndex,
    cfg: Config,
    device: torch.device,
    reporter: Reporter,
    metrics: MetricsLog,
) -> tuple[nn.Linear, dict]:
    """Train a linear layer on the frozen ``backbone``; returns it and {top1, top5, best_top1, best_epoch, history, mode}.

    The backbone is put in eval mode with gradients off for the duration and restored afterwards;
    its weights and buffers are not changed (BatchNorm statistics included).
    """
    num_classes = len(train_index.classes)
    if num_classes < 2:
        raise UserError(
            f"the training split {train_index.root} has {num_classes} class; linear-eval needs at least 2 class folders"
        )
    was_training = backbone.training
    grads = [p.requires_grad for p in backbone.parameters()]
    backbone.eval().requires_grad_(False)
    try:
        (val_x,), val_y = extract_with_config(backbone, val_index, cfg, device, reporter, "val features")
        val_y = val_y.to(device)
        seed_everything(cfg.seed)
        if cfg.eval.cached_features:
            fc, history = _train_cached(
                backbone, train_index, val_x, val_y, num_classes, cfg, device, reporter, metrics
            )
        else:
            fc, history = _train_augmented(
                backbone, train_index, val_x, val_y, num_classes, cfg, device, reporter, metrics
            )
    finally:
        backbone.train(was_training)
        for p, g in zip(backbone.parameters(), grads):
            p.requires_grad_(g)
    if not history:
        raise UserError("linear-eval trained for 0 epochs; set train.epochs >= 1 (and train.max_steps=0)")
    best = max(history, key=lambda e: e["top1"])
    return fc, {
        "top1": history[-1]["top1"],
        "top5": history[-1]["top5"],
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
        "history": history,
        "mode": "cached-features" if cfg.eval.cached_features else "augmented",
    }


def run_linear_eval(
    checkpoint: str,
    preset: Optional[str],
    overrides: list[str],
    *,
    out: Optional[str],
    force: bool,
    show_progress: bool = True,
) -> dict:
    """Linear probe of ``checkpoint``'s frozen backbone; writes ``classifier.safetensors`` and
    returns the JSON-ready result: ``top1``, ``top5``, ``best_top1``, ``mode``, ``checkpoint``, ``run_dir`` ..."""
    refuse_early("linear-eval", out, force)
    backbone, _, info = load_backbone(checkpoint)
    cfg = resolve_config("linear-eval", preset, overrides, info)
    cfg.eval.protocol = "linear"
    train_index, val_index = labelled_splits(cfg)
    device = process_device(cfg.device)
    backbone = prepare_backbone(backbone, cfg, device)
    fingerprint = backbone_fingerprint(backbone)
    run_dir = open_run("linear-eval", cfg, out, force, {"source": info.source, "arch": info.description})
    reporter = Reporter(enabled=show_progress)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    with file_log(run_dir / "train.log"):
        log.info(
            "linear-eval of %s (%s): %d train / %d val images, %d classes, %s path",
            info.source,
            info.description,
            len(train_index),
            len(val_index),
            len(train_index.classes),
            "cached-features" if cfg.eval.cached_features else "augmented",
        )
        with reporter:
            fc, res = linear_probe(backbone, train_index, val_index, cfg, device, reporter, metrics)
    path = run_dir / "classifier.safetensors"
    summary_info = {k: res[k] for k in ("top1", "top5", "best_top1", "best_epoch", "mode")}
    if dist.is_main():
        save_classifier(
            path,
            fc.weight.detach(),
            fc.bias.detach(),
            info=info,
            fingerprint=fingerprint,
            classes=list(train_index.classes),
            extra={"protocol": "linear", **summary_info},
        )
    result = {  # accuracies rounded to 4 decimals: float32 accumulation noise is not information
        "top1": round(res["top1"], 4),
        "top5": round(res["top5"], 4),
        "checkpoint": str(path),
        "best_top1": round(res["best_top1"], 4),
        "best_epoch": res["best_epoch"],
        "mode": res["mode"],
        "epochs": len(res["history"]),
        "num_classes": len(train_index.classes),
        "num_train": len(train_index),
        "num_val": len(val_index),
        "source": info.source,
        "arch": info.description,
        "run_dir": str(run_dir),
    }
    metrics.write({"type": "final", **{k: result[k] for k in ("top1", "top5", "best_top1", "best_epoch", "mode")}})
    close_run(run_dir, result)
    return result
