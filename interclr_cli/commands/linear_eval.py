"""`interclr linear-eval`: a linear classifier on the frozen backbone's pooled features.

Two paths, the same protocol otherwise (He et al., "Momentum Contrast", CVPR 2020, Sec. 4.1):

- ``augmented`` (default): every step loads a batch with the training augmentation, runs the
  frozen backbone (eval mode, ``no_grad``) and updates the linear layer; the step schedule and
  the learning rate follow ``optim.*`` per iteration (:func:`~interclr_cli.training.optim.lr_factor`).
- ``cached-features`` (``--cached-features``): the frozen features of the training set are
  extracted once (centre crop, plus ``eval.cached_aug_copies`` augmented copies) and the layer is
  trained on them by :func:`~interclr_cli.eval.linear.train_linear_on_features`; an epoch then visits
  every copy.

Validation features never change (frozen backbone, deterministic transform), so both paths
extract them once and score the layer on them after every epoch.

Distributed (torchrun/srun): ``train.batch_size`` is per process and the learning rate follows the
global batch (:func:`~interclr_cli.commands.common.global_lr`). Feature extraction is
sharded across the processes and gathered in dataset order. The augmented path gives each process
its slice of every global batch (:class:`~interclr_cli.data.EpochBatchSampler`) and averages the
layer's gradients with DistributedDataParallel, so the layer ends as after one process on the same
global batch (up to the order of float sums). The cached-features path trains the layer on the
gathered features, on the global batch, identically on every process (an epoch is a few matrix
products) and keeps rank 0's copy. Rank 0 alone writes files and shows progress.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config.schema import Config
from ..data import linear_train_transform
from ..data.sources import FileIndex
from ..errors import UserError, WorkError
from ..eval.linear import train_linear_on_features
from ..runtime import dist
from ..runtime.ddp import ddp_module
from ..runtime.device import autocast, memory_format
from ..training.optim import build_optimizer, lr_factor, set_lr
from ..runtime.progress import Reporter
from ..training.rundir import MetricsLog, attach_file_log, detach_log
from ..training.pretraining import seed_everything
from .common import close_run, epoch_totals, global_lr, labelled_splits, open_run, prepare_backbone, rank_device, refuse_early, resolve_config, run_extract, supervised_loader
from .loading import backbone_fingerprint, describe, load_backbone, save_classifier

log = logging.getLogger("interclr")


def new_linear(dim: int, num_classes: int, seed: int) -> nn.Linear:
    """MoCo's initialisation (weight ~ N(0, 0.01), bias 0), from a seeded generator."""
    fc = nn.Linear(dim, num_classes)
    with torch.no_grad():
        fc.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(seed))
        fc.bias.zero_()
    return fc


@torch.no_grad()
def score(fc: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> dict:
    """Validation loss and top-1/top-5 (percent) of ``fc`` on features ``x`` (chunked, on x's device)."""
    fc.eval()
    loss = torch.zeros((), device=x.device)
    hits1 = torch.zeros((), device=x.device)
    hits5 = torch.zeros((), device=x.device)
    for s in range(0, x.shape[0], chunk):
        logits = fc(x[s:s + chunk].float())
        yb = y[s:s + chunk]
        loss += F.cross_entropy(logits, yb, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == yb[:, None]
        hits1 += hit[:, 0].sum()
        hits5 += hit.any(dim=1).sum()
    n = max(x.shape[0], 1)
    vals = torch.stack([loss, hits1, hits5]).tolist()  # one sync
    return {"val_loss": vals[0] / n, "top1": 100.0 * vals[1] / n, "top5": 100.0 * vals[2] / n}


def _train_augmented(backbone, train_index, val_x, val_y, num_classes, cfg: Config, device, reporter, metrics) -> tuple[nn.Linear, list[dict]]:
    fc = new_linear(val_x.shape[1], num_classes, cfg.seed).to(device)
    _, lr0 = global_lr(cfg)
    optimizer = build_optimizer(cfg.optim, [{"params": list(fc.parameters())}], lr0)
    head = ddp_module(fc, device)  # training steps go through the wrapper, scoring through fc
    world = dist.world_size()
    loader, sampler = supervised_loader(train_index, cfg, drop_last=False)
    spe = sampler.steps_per_epoch
    total = spe * cfg.train.epochs
    limit = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    fmt = memory_format(cfg.train.channels_last)
    history: list[dict] = []
    step = 0
    for epoch in range(cfg.train.epochs):
        if step >= limit:
            break
        sampler.set_epoch(epoch)
        fc.train()
        task = reporter.task(f"linear epoch {epoch + 1}/{cfg.train.epochs}", total=spe)
        loss_sum = torch.zeros((), device=device)
        seen, skipped = 0, 0
        t0 = tlog = time.perf_counter()
        ilog = 0
        lr = optimizer.param_groups[0]["lr"]
        for batch in loader:
            skipped += int(batch.get("skipped", 0))
            bsz = batch["index"].numel()
            if bsz == 0:
                continue
            x = batch["image"].to(device, non_blocking=True).to(memory_format=fmt)
            y = batch["label"].to(device, non_blocking=True)
            lr = set_lr(optimizer, lr_factor(cfg.optim, step, spe, total))
            with torch.no_grad(), autocast(device, cfg.train.precision):
                feats = backbone(x)
            loss = F.cross_entropy(head(feats.float()), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.detach() * bsz
            seen += bsz
            ilog += bsz * world
            if step % cfg.train.log_every == 0:
                loss_v = dist.all_reduce_mean(loss.detach()).item()  # the one sync per logging interval
                if not math.isfinite(loss_v):
                    raise WorkError(f"linear-eval diverged: the loss is {loss_v} at step {step}; lower optim.lr")
                now = time.perf_counter()
                rate = ilog / max(now - tlog, 1e-9)
                tlog, ilog = now, 0
                metrics.write({"type": "step", "epoch": epoch + 1, "step": step, "loss": loss_v, "lr": lr, "img_per_s": rate})
                reporter.update(task, info=f"loss {loss_v:.4f} lr {lr:.4g} {rate:.1f} img/s")
            reporter.update(task, advance=1)
            if step >= limit:
                break
        reporter.finish(task)
        train_loss, seen, skipped = epoch_totals(loss_sum, seen, skipped)  # every rank's share
        if not math.isfinite(train_loss):
            raise WorkError(f"linear-eval diverged: the training loss is {train_loss} in epoch {epoch + 1}; lower optim.lr")
        elapsed = time.perf_counter() - t0
        entry = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, **score(fc, val_x, val_y),
                 "seconds": elapsed, "img_per_s": seen / max(elapsed, 1e-9), "skipped": skipped}
        history.append(entry)
        metrics.write({"type": "epoch", **entry})
        reporter.print(f"epoch {epoch + 1}/{cfg.train.epochs}  loss {train_loss:.4f}  val top-1 {entry['top1']:.2f}  "
                       f"top-5 {entry['top5']:.2f}  {entry['img_per_s']:.1f} img/s")
    return fc.eval(), history


def _train_cached(backbone, train_index, val_x, val_y, num_classes, cfg: Config, device, reporter, metrics) -> tuple[nn.Linear, list[dict]]:
    (tx,), ty = run_extract(backbone, train_index, cfg, device, reporter, "train features")
    xs, ys = [tx], [ty]
    for c in range(1, cfg.eval.cached_aug_copies + 1):
        # copy c is a function of (seed, c, image), whichever rank or worker loads the image
        (ax,), ay = run_extract(backbone, train_index, cfg, device, reporter, f"augmented copy {c}",
                                transform=linear_train_transform(cfg.data), aug_seed=cfg.seed * 1000 + c)
        xs.append(ax)
        ys.append(ay)
    train_x = torch.cat(xs)
    train_y = torch.cat(ys).to(device)
    batch, lr = global_lr(cfg)  # every rank holds every feature: each trains on the global batch
    o = cfg.optim
    schedule = o.schedule if o.schedule in ("step", "cosine") else "step"
    milestones = o.milestones if o.schedule == "step" else []
    epochs = cfg.train.epochs
    task = reporter.task("linear (cached features)", total=epochs)

    def progress(entry: dict) -> None:
        metrics.write({"type": "epoch", **entry})
        reporter.update(task, advance=1, info=f"loss {entry['train_loss']:.4f} top-1 {entry['top1']:.2f}")

    fc, res = train_linear_on_features(train_x, train_y, val_x, val_y, num_classes, epochs=epochs, lr=lr,
                                       momentum=o.momentum, weight_decay=o.weight_decay, batch_size=batch,
                                       milestones=milestones, gamma=o.gamma, schedule=schedule, seed=cfg.seed,
                                       device=device, progress_cb=progress)
    reporter.finish(task)
    for t in (fc.weight, fc.bias):  # rank 0's layer (GPU kernels need not be bit-reproducible)
        dist.broadcast_(t.data, 0)
    return fc.eval(), res["history"]


def linear_probe(backbone: nn.Module, train_index: FileIndex, val_index: FileIndex, cfg: Config, device: torch.device,
                 reporter: Reporter, metrics: MetricsLog) -> tuple[nn.Linear, dict]:
    """Train a linear layer on the frozen ``backbone``; returns it and {top1, top5, best_top1, best_epoch, history, mode}.

    The backbone is put in eval mode with gradients off for the duration and restored afterwards;
    its weights and buffers are not changed (BatchNorm statistics included).
    """
    num_classes = len(train_index.classes)
    if num_classes < 2:
        raise UserError(f"the training split {train_index.root} has {num_classes} class; linear-eval needs at least 2 class folders")
    was_training = backbone.training
    grads = [p.requires_grad for p in backbone.parameters()]
    backbone.eval().requires_grad_(False)
    try:
        (val_x,), val_y = run_extract(backbone, val_index, cfg, device, reporter, "val features")
        val_y = val_y.to(device)
        seed_everything(cfg.seed)
        if cfg.eval.cached_features:
            fc, history = _train_cached(backbone, train_index, val_x, val_y, num_classes, cfg, device, reporter, metrics)
        else:
            fc, history = _train_augmented(backbone, train_index, val_x, val_y, num_classes, cfg, device, reporter, metrics)
    finally:
        backbone.train(was_training)
        for p, g in zip(backbone.parameters(), grads):
            p.requires_grad_(g)
    if not history:
        raise UserError("linear-eval trained for 0 epochs; set train.epochs >= 1 (and train.max_steps=0)")
    best = max(history, key=lambda e: e["top1"])
    return fc, {"top1": history[-1]["top1"], "top5": history[-1]["top5"], "best_top1": best["top1"], "best_epoch": best["epoch"],
                "history": history, "mode": "cached-features" if cfg.eval.cached_features else "augmented"}


def run_linear_eval(checkpoint: str, preset: Optional[str], overrides: list[str], *, out: Optional[str], force: bool,
                    show_progress: bool = True) -> dict:
    refuse_early("linear-eval", out, force)
    backbone, _, info = load_backbone(checkpoint)
    cfg = resolve_config("linear-eval", preset, overrides, info)
    cfg.eval.protocol = "linear"
    train_index, val_index = labelled_splits(cfg)
    device = rank_device(cfg)
    backbone = prepare_backbone(backbone, cfg, device)
    fingerprint = backbone_fingerprint(backbone)
    run_dir = open_run("linear-eval", cfg, out, force, {"source": info["source"], "arch": describe(info)})
    reporter = Reporter(enabled=show_progress)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    handler = attach_file_log(run_dir / "train.log")
    try:
        log.info("linear-eval of %s (%s): %d train / %d val images, %d classes, %s path", info["source"], describe(info),
                 len(train_index), len(val_index), len(train_index.classes),
                 "cached-features" if cfg.eval.cached_features else "augmented")
        with reporter:
            fc, res = linear_probe(backbone, train_index, val_index, cfg, device, reporter, metrics)
    finally:
        detach_log(handler)
    path = run_dir / "classifier.safetensors"
    summary_info = {k: res[k] for k in ("top1", "top5", "best_top1", "best_epoch", "mode")}
    if dist.is_main():
        save_classifier(path, fc.weight.detach(), fc.bias.detach(), info=info, fingerprint=fingerprint,
                        classes=list(train_index.classes), extra={"protocol": "linear", **summary_info})
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
        "source": info["source"],
        "arch": describe(info),
        "run_dir": str(run_dir),
    }
    metrics.write({"type": "final", **{k: result[k] for k in ("top1", "top5", "best_top1", "best_epoch", "mode")}})
    close_run(run_dir, result)
    return result

