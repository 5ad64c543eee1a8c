"""Optimizers (SGD, LARS) and the per-iteration learning-rate schedule."""

from __future__ import annotations

import logging
import math

import torch

from ..config.schema import Config, OptimConfig, TrainConfig
from ..errors import UserError

log = logging.getLogger("interclr")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., arXiv 1708.03888).

    The trust ratio ``eta * ||w|| / (||g|| + wd * ||w||)`` scales each parameter's update;
    one-dimensional parameters (biases, BatchNorm) skip both weight decay and adaptation, as is
    common practice (e.g. BYOL, SimCLR).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    if g["weight_decay"]:
                        d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where(
                        (w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm, torch.ones_like(w_norm)
                    )
                    d = d.mul(trust)
                st = self.state[p]
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])
        return loss


def build_optimizer(cfg: OptimConfig, param_groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """``param_groups`` carry an optional ``lr_mult``; ``lr`` is the (batch-scaled) base rate."""
    groups = []
    for g in param_groups:
        g = dict(g)
        g["initial_lr"] = lr * g.pop("lr_mult", 1.0)
        g["lr"] = g["initial_lr"]
        groups.append(g)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al., arXiv 1706.02677): lr * global_batch / reference_batch."""
    if cfg.reference_batch > 0:
        return cfg.lr * global_batch / cfg.reference_batch
    return cfg.lr


def per_process_batch(train: TrainConfig, world: int) -> int:
    """Images per process and step: ``train.global_batch / world`` when ``global_batch > 0`` (a
    one-line error when it does not divide), else ``train.batch_size``."""
    g = train.global_batch
    if g <= 0:
        return train.batch_size
    if g % world:
        lo, hi = (g // world) * world, -(-g // world) * world
        raise UserError(
            f"train.global_batch={g} does not divide over {world} processes; use a multiple of {world} "
            f"(e.g. {lo or hi} or {hi}), or train.global_batch=0 with a per-process train.batch_size"
        )
    return g // world


def resolve_batch(cfg: Config, world: int) -> int:
    """Set ``cfg.train.batch_size`` to :func:`per_process_batch` (so the run's config.yaml records
    it) and return it."""
    cfg.train.batch_size = per_process_batch(cfg.train, world)
    return cfg.train.batch_size


def global_lr(cfg: OptimConfig, batch_size: int, world: int) -> tuple[int, float]:
    """(global batch, base learning rate) of ``world`` processes with ``batch_size`` images each:
    :func:`scaled_lr` of the global batch. Logs one line: world x per-process = global, the lr
    and the rule that gave it."""
    batch = batch_size * world
    lr = scaled_lr(cfg, batch)
    rule = (
        f" = {cfg.lr:g} x {batch}/{cfg.reference_batch} (linear scaling rule)"
        if cfg.reference_batch > 0
        else " (optim.reference_batch=0: not scaled)"
    )
    log.info(f"batch {world} x {batch_size} = {batch} (processes x per process = global); lr {lr:.4g}{rule}")
    return batch, lr


def lr_factor(cfg: OptimConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the initial lr at iteration ``step`` (0-based), updated every iteration.

    Linear warm-up over ``warmup_epochs``, then ``cosine`` (half a cosine from 1 to
    ``min_lr / lr`` over the remaining iterations), ``step`` (x gamma at each epoch milestone)
    or ``constant``.
    """
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "cosine":
        span = max(1, total_steps - warm)
        t = min(1.0, (step - warm) / span)
        floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]
