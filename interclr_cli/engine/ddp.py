"""Gradient synchronisation for multi-process training (placeholder until the DDP issue)."""

from __future__ import annotations

import torch
import torch.distributed as tdist

from . import dist


class GradAverager:
    """Averages the gradients of the method's trainable parameters across ranks after backward.

    Equivalent to DistributedDataParallel's all-reduce (sum / world size), done in one flat
    buffer per dtype so it costs one collective per step.
    """

    def __init__(self, method: torch.nn.Module):
        self.params = [p for p in method.parameters() if p.requires_grad]

    @torch.no_grad()
    def sync_gradients(self) -> None:
        if not dist.is_dist():
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p, g in zip(self.params, grads):
            if p.grad is None:
                p.grad = g
        flat = torch.cat([g.reshape(-1) for g in grads])
        tdist.all_reduce(flat)
        flat /= dist.world_size()
        off = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[off : off + n].view_as(g))
            off += n


def wrap_ddp(method: torch.nn.Module, device: torch.device) -> GradAverager:
    # identical initial weights on every rank
    for t in list(method.parameters()) + list(method.buffers()):
        dist.broadcast_(t.data, 0)
    return GradAverager(method)
