"""Reference implementations the distributed tests compare the package against (test-only)."""

from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.nn as nn

from interclr_cli.runtime import dist
from interclr_cli.runtime.ddp import _bn_buffers, sync_bn_buffers


class GradAverager:
    """Averages the gradients of the method's trainable parameters across ranks after backward.

    Equivalent to DistributedDataParallel's all-reduce (sum / world size), done in one flat
    buffer so it costs one collective per step, but without overlapping backward: the reference
    :class:`~interclr_cli.runtime.ddp.DDPMethod` is tested against. Call :meth:`sync_gradients`
    after ``loss.backward()``.
    """

    def __init__(self, method: nn.Module):
        self.method = method
        self.params = [p for p in method.parameters() if p.requires_grad]
        for t in list(method.parameters()) + _bn_buffers(method):  # identical initial weights
            dist.broadcast_(t.data, 0)

    def training_step(self, batch, step: int, epoch: int):
        """``method.training_step`` unchanged."""
        return self.method.training_step(batch, step, epoch)

    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Replace every trainable gradient by its mean over ranks (missing ones count as zero)."""
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

    def sync_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm running statistics."""
        sync_bn_buffers(self.method)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        ctx.rows = t.shape[0]
        out = [torch.empty_like(t) for _ in range(dist.world_size())]
        tdist.all_gather(out, t.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # d(sum_r L_r)/d t_local = sum over ranks of their gradient w.r.t. this rank's rows
        grad = grad.contiguous()
        n = ctx.rows
        if grad.is_cuda:  # NCCL: a reduce-scatter sends 1/world of an all-reduce
            out = torch.empty_like(grad[:n])
            tdist.reduce_scatter_tensor(out, grad)
            return out
        grad = grad.clone()
        tdist.all_reduce(grad)
        r = dist.rank()
        return grad[r * n : (r + 1) * n]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` [B, ...] from every rank along dim 0 (rank order), keeping the gradient.

    Every rank must pass the same shape. In backward each rank receives the sum over ranks of the
    gradient w.r.t. its own rows; with DDP averaging the parameter gradients afterwards, the step
    equals a one-process step on the global batch (the rule ``dist.all_reduce_sum_with_grad``
    follows too).
    """
    if not dist.is_dist() or dist.world_size() == 1:
        return t
    return _AllGatherWithGrad.apply(t)
