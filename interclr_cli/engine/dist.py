"""Collectives behind one small module.

A one-process run pays nothing: every function short-circuits when torch.distributed is not
initialised. Methods call these instead of torch.distributed directly, so tests can run the same
code under gloo with several processes.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def is_main() -> bool:
    return rank() == 0


@torch.no_grad()
def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0 (rank order), without gradient.

    All ranks must pass tensors of the same shape.
    """
    if not is_dist():
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    tdist.all_gather(out, t.contiguous())
    return torch.cat(out, 0)


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from ``src``; a no-op on one process."""
    if is_dist():
        tdist.broadcast(t, src)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return t
    t = t.clone()
    tdist.all_reduce(t)
    return t / world_size()


def barrier() -> None:
    if is_dist():
        tdist.barrier()
