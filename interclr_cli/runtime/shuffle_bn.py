"""Shuffle-BN for the MoCo key encoder (He et al., CVPR 2020, Sec. 3.3, "Shuffling BN").

With per-device BatchNorm, a query and its key computed on the same device share batch
statistics, which leaks information the model can exploit to find the positive. Shuffle-BN
assigns the key images to devices by a random permutation of the global batch, runs the key
encoder, and sends every key back to the rank that owns the image.

MoCo's reference gathers *every* image on *every* rank and keeps a slice; here each rank sends only
the images another rank needs (one uneven ``all_to_all_single`` each way), which moves
``B (W-1)/W`` images per rank instead of ``B (W-1)``. Which images a rank normalises together is
the same as in the reference: rank ``s`` runs the images at positions ``perm[s*B:(s+1)*B]`` of
the global batch (BatchNorm does not depend on their order).

The permutation is built on the host: callers draw it from a CPU generator seeded identically on
every rank (and saved with the method, so resume restores it), or it is drawn from the global CPU
generator and broadcast from rank 0. The split sizes are computed on the host too, so the step
reads nothing back from the device.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

from . import dist
from .device import host_to_device


def global_permutation(n: int) -> torch.Tensor:
    """A permutation of ``range(n)`` [n] on the CPU, drawn from the global CPU generator and
    broadcast from rank 0 (through the process group's CPU backend)."""
    return dist.broadcast_(torch.randperm(n), 0)


def assignment(perm: torch.Tensor, batch: int, world: int) -> torch.Tensor:
    """dest[g]: the rank that runs global sample ``g`` (rank r owns samples r*B .. r*B+B-1)."""
    dest = torch.empty_like(perm)
    dest[perm] = torch.arange(perm.numel(), device=perm.device) // batch
    return dest


@torch.no_grad()
def shuffled_forward(encoder: torch.nn.Module, x: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    """``encoder(x)`` [B, ...] with batch statistics from a random cross-rank subset of the global batch.

    ``perm`` [W*B]: a CPU permutation of the global batch, identical on every rank (default: drawn
    and broadcast by :func:`global_permutation`). Every rank must pass the same batch size.
    Without distribution this is ``encoder(x)``.
    """
    world = dist.world_size()
    if world == 1:
        return encoder(x)
    b, r = x.shape[0], dist.rank()
    perm = global_permutation(b * world) if perm is None else perm.cpu()
    dest = assignment(perm, b, world)  # [W*B] on the host
    mine = dest[r * b : (r + 1) * b]
    order = torch.argsort(mine, stable=True)  # my rows grouped by destination rank
    send_split = torch.bincount(mine, minlength=world).tolist()  # host tensors: no device sync
    recv_split = (dest.view(world, b) == r).sum(1).tolist()
    order = host_to_device(order, x.device)

    x_send = x[order].contiguous()
    x_recv = x.new_empty((sum(recv_split),) + tuple(x.shape[1:]))
    tdist.all_to_all_single(x_recv, x_send, output_split_sizes=recv_split, input_split_sizes=send_split)

    y_recv = encoder(x_recv).contiguous()
    y_back = y_recv.new_empty((b,) + tuple(y_recv.shape[1:]))
    tdist.all_to_all_single(y_back, y_recv, output_split_sizes=send_split, input_split_sizes=recv_split)
    return torch.empty_like(y_back).index_copy_(0, order, y_back)
