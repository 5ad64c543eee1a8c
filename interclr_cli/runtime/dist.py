"""Collectives behind one small module.

A one-process run pays nothing: every function short-circuits when torch.distributed is not
initialised. Methods call these instead of torch.distributed directly, so tests can run the same
code under gloo with several processes.

Two kinds of collectives:

* ``all_gather_cat`` / ``broadcast_`` / ``all_reduce_mean``: no gradient (queues, banks, labels,
  logged scalars).
* ``all_reduce_sum_with_grad``: autograd-aware. A plain in-place ``all_reduce`` passes the
  gradient through as the identity, which after DistributedDataParallel's averaging is 1/world
  of the true gradient; this one *sums* the incoming gradients over ranks in backward, which is
  what makes "every rank computes its loss on the reduced tensor, DDP averages the parameter
  gradients" equal to the one-process gradient of the mean loss over the global batch
  (``tests/test_distributed.py`` checks the right and the wrong answer, and the same for a
  gather with gradient, ``tests/dist_helpers.py``).
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as tdist

T = TypeVar("T")


def is_dist() -> bool:
    """True when a torch.distributed process group is initialised."""
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return tdist.get_world_size() if is_dist() else 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return tdist.get_rank() if is_dist() else 0


def local_rank() -> int:
    """The rank within this node (``LOCAL_RANK`` from torchrun, ``SLURM_LOCALID`` under srun)."""
    if not is_dist():
        return 0
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return rank()


def is_main() -> bool:
    """True on rank 0 (and in a one-process run)."""
    return rank() == 0


# -- without gradient ------------------------------------------------------------------------------


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


@torch.no_grad()
def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather_cat` but the ranks may hold different numbers of rows
    (same trailing shape and dtype); rows are padded to the largest count for the collective."""
    if not is_dist():
        return t
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    counts = all_gather_cat(n).tolist()
    m = max(counts)
    pad = t.new_zeros((m,) + tuple(t.shape[1:]))
    pad[: t.shape[0]] = t
    full = all_gather_cat(pad)
    return torch.cat([full[i * m : i * m + c] for i, c in enumerate(counts)], 0)


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from ``src``; a no-op on one process."""
    if is_dist():
        tdist.broadcast(t, src)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as ``src`` has it (picklable, small: paths, names, numbers)."""
    if not is_dist():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj`` (small, picklable), in rank order; ``[obj]`` on one process."""
    if not is_dist():
        return [obj]
    out: list = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a new tensor, no gradient); ``t`` itself on one process."""
    if not is_dist():
        return t
    t = t.clone()
    tdist.all_reduce(t)
    return t / world_size()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor, no gradient); ``t`` itself on one process."""
    if not is_dist():
        return t
    t = t.clone()
    tdist.all_reduce(t)
    return t


def barrier() -> None:
    """Wait until every rank gets here; a no-op on one process."""
    if is_dist():
        tdist.barrier()


def check_same(value: Any, what: str) -> None:
    """Raise on every rank unless every rank passes an equal ``value`` (a small picklable)."""
    if not is_dist():
        return
    values = all_gather_object(value)
    if any(v != values[0] for v in values[1:]):
        from ..errors import UserError

        bad = next(i for i, v in enumerate(values) if v != values[0])
        raise UserError(
            f"the ranks disagree on {what}: rank 0 has {values[0]!r}, rank {bad} has {values[bad]!r}; "
            "every rank must see the same files (use a shared file system for data and run folders)"
        )


# -- with gradient ---------------------------------------------------------------------------------


class _AllReduceSumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        tdist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad)
        return grad


def all_reduce_sum_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks, keeping the gradient (backward sums the gradients over ranks)."""
    if not is_dist() or world_size() == 1:
        return t
    return _AllReduceSumWithGrad.apply(t)


# -- rank 0 first / only ---------------------------------------------------------------------------


def main_first(fn: Callable[[bool], T]) -> T:
    """``fn(True)`` on rank 0, then ``fn(False)`` on the other ranks once rank 0 is done (e.g.
    rank 0 writes a cache the others read). An error on rank 0 is raised on every rank."""
    if not is_dist():
        return fn(True)
    from ..errors import UserError

    result, err = None, None
    if is_main():
        try:
            result = fn(True)
        except UserError as e:
            err = str(e)
    err = broadcast_object(err)
    if err is not None:
        raise UserError(err)
    if not is_main():
        result = fn(False)
    return result


def main_only(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only (e.g. k-means and file writes); every rank returns its result (a
    small picklable), broadcast from rank 0. An error on rank 0 is raised on every rank (the same
    class for :class:`~interclr_cli.errors.UserError` and ``WorkError``), so no rank waits for a
    broadcast that never comes."""
    if not is_dist():
        return fn()
    from ..errors import UserError, WorkError

    if is_main():
        try:
            result = fn()
        except Exception as e:
            kind = "user" if isinstance(e, UserError) else "work" if isinstance(e, WorkError) else "internal"
            broadcast_object(("error", kind, str(e) if kind != "internal" else f"{type(e).__name__}: {e}"))
            raise
        return broadcast_object(("ok", result))[1]
    status, *rest = broadcast_object(None)
    if status == "ok":
        return rest[0]
    kind, message = rest
    if kind == "user":
        raise UserError(message)
    raise WorkError(message if kind == "work" else f"rank 0 failed: {message}")
