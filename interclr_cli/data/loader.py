"""DataLoaders for training (a batch sampler) and evaluation (every index once, in order)."""

from __future__ import annotations

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from .datasets import collate_skip


def _loader_kwargs(num_workers: int, pin_memory: bool, persistent_workers: bool, prefetch_factor: int) -> dict:
    kw = {"num_workers": num_workers, "pin_memory": bool(pin_memory) and torch.cuda.is_available()}
    if num_workers > 0:
        kw["persistent_workers"] = bool(persistent_workers)
        kw["prefetch_factor"] = prefetch_factor
    return kw


def build_loader(
    dataset: Dataset,
    batch_sampler,
    *,
    num_workers: int,
    pin_memory: bool,
    persistent_workers: bool,
    prefetch_factor: int,
    collate_fn=collate_skip,
) -> DataLoader:
    """A training loader over ``batch_sampler`` (e.g. :class:`EpochBatchSampler`) with ``collate_fn``
    (:func:`collate_skip` by default).

    Memory is pinned only when CUDA is available; ``persistent_workers`` and ``prefetch_factor``
    apply only with ``num_workers > 0``.
    """
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_fn,
        **_loader_kwargs(num_workers, pin_memory, persistent_workers, prefetch_factor),
    )


def eval_shard(num_samples: int, rank: int = 0, world_size: int = 1) -> range:
    """The contiguous indices rank ``rank`` evaluates.

    Every shard but the trailing ones has ``ceil(num_samples / world_size)`` indices, so padding
    each rank's rows to that size, gathering in rank order and keeping the first ``num_samples``
    rows restores index order.
    """
    size = -(-num_samples // world_size)
    return range(min(rank * size, num_samples), min((rank + 1) * size, num_samples))


def loader_from_config(dataset: Dataset, batch_sampler, data_cfg, collate_fn=collate_skip) -> DataLoader:
    """:func:`build_loader` with the worker settings of a ``DataConfig`` (``data.*`` keys)."""
    return build_loader(
        dataset,
        batch_sampler,
        collate_fn=collate_fn,
        num_workers=data_cfg.num_workers,
        pin_memory=data_cfg.pin_memory,
        persistent_workers=data_cfg.persistent_workers,
        prefetch_factor=data_cfg.prefetch_factor,
    )


def build_eval_loader(
    dataset: Dataset, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1, collate_fn=collate_skip
) -> DataLoader:
    """Every index of :func:`eval_shard` once, in order, in batches of ``batch_size`` (last one smaller).

    Unreadable images are dropped from their batch (see :func:`collate_skip`); ``batch["index"]``
    tells which rows are present.
    """
    sampler = BatchSampler(eval_shard(len(dataset), rank, world_size), batch_size, drop_last=False)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        **_loader_kwargs(num_workers, True, False, 2),
    )
