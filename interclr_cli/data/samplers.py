"""The training batch sampler: seeded per epoch, sharded across ranks, resumable mid-epoch.

Each epoch has a global order of sample indices drawn from a ``torch.Generator`` seeded by
``(seed, epoch)``: a permutation, or ``num_samples`` uniform draws with replacement (the InterCLR
reference sampler). Global step ``k`` takes the next ``batch_size * world_size`` positions of that
order and rank ``r`` takes the ``r``-th block of ``batch_size`` of them, so the global batch does
not depend on how it is split across ranks, every rank sees the same number of batches, and the
ranks' shares are disjoint. Every sample carries an augmentation seed, a 63-bit hash of
``(seed, epoch, position in the global order)``.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..errors import UserError

_MASK64 = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(*parts: int) -> np.ndarray:
    """A uint64 [1] hash of a sequence of integers."""
    h = np.zeros(1, dtype=np.uint64)
    for p in parts:
        h = _mix(h ^ np.array([p & _MASK64], dtype=np.uint64))
    return h


def hashed_seed(*parts: int) -> int:
    """A 63-bit seed that is a function of the integers ``parts`` alone (numpy's SeedSequence
    hash; the first part, a user's seed, is taken modulo 2**32)."""
    ss = np.random.SeedSequence([int(parts[0]) & 0xFFFFFFFF, *(int(p) for p in parts[1:])])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def aug_seeds(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """63-bit augmentation seeds (int64 >= 0) for positions in the epoch's global order."""
    k = _key(seed, epoch, 1)
    return (_mix(k ^ _mix(np.asarray(positions, dtype=np.uint64))) >> np.uint64(1)).astype(np.int64)


class EpochBatchSampler:
    """Batches of ``(index, aug_seed)`` for one rank; a DataLoader ``batch_sampler``.

    ``drop_last=True`` drops the tail that does not fill a global batch. ``drop_last=False`` pads
    the order by wrapping around to a multiple of ``world_size`` and ends with one smaller batch.
    Call :meth:`set_epoch` before iterating each epoch; ``start_step`` skips that many batches.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        replacement: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler arguments: batch_size={batch_size} rank={rank} world_size={world_size}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.replacement = bool(replacement)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        global_batch = self.batch_size * self.world_size
        if self.drop_last:
            self._steps = self.num_samples // global_batch
            self._total = self._steps * global_batch
        else:
            self._total = -(-self.num_samples // self.world_size) * self.world_size if self.num_samples else 0
            self._steps = -(-self._total // global_batch)
        if self._steps == 0:
            raise UserError(
                f"the data set has {self.num_samples} images, fewer than one global batch "
                f"({self.batch_size} x {self.world_size} ranks); lower train.batch_size or add images"
            )
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        """Batches in a full epoch (the same on every rank)."""
        return self._steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch to iterate next, starting after its first ``start_step`` batches."""
        if not 0 <= start_step <= self._steps:
            raise UserError(
                f"cannot resume at step {start_step} of epoch {epoch}: an epoch has {self._steps} steps; "
                "the data set or batch size differs from the checkpoint's, start a new run"
            )
        self.epoch = int(epoch)
        self.start_step = int(start_step)

    def __len__(self) -> int:
        return self._steps - self.start_step

    def global_order(self, epoch: int) -> np.ndarray:
        """The epoch's global order of sample indices (int64, padded when ``drop_last=False``)."""
        g = torch.Generator()
        g.manual_seed(int(_key(self.seed, epoch, 0)[0] >> np.uint64(1)))
        n = self.num_samples
        if self.replacement:
            order = torch.randint(n, (n,), generator=g, dtype=torch.int64)
        else:
            order = torch.randperm(n, generator=g, dtype=torch.int64)
        order = order.numpy()
        if self._total > n:  # drop_last=False: wrap around to a multiple of world_size
            order = np.concatenate([order, np.resize(order, self._total - n)])
        return order[: self._total]

    def _block(self, step: int) -> tuple[int, int]:
        """[lo, hi) positions of this rank's batch at ``step`` in the global order."""
        global_batch = self.batch_size * self.world_size
        base = step * global_batch
        share = min(global_batch, self._total - base) // self.world_size
        lo = base + self.rank * share
        return lo, lo + share

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.global_order(self.epoch)
        for step in range(self.start_step, self._steps):
            lo, hi = self._block(step)
            seeds = aug_seeds(self.seed, self.epoch, np.arange(lo, hi))
            yield list(zip(order[lo:hi].tolist(), seeds.tolist()))
