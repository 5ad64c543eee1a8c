"""Feature extraction over a data set with the evaluation transform (no augmentation).

Used by the InterCLR initial k-means, the training monitors and the evaluation commands. With
several ranks, each extracts a contiguous shard and the shards are all-gathered in index order
(every rank ends with all N rows; each sends its own shard only once per peer, half the traffic
of an all-reduce over zero-padded [N, D] buffers).
"""

from __future__ import annotations

import zlib
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..data import ImageDataset, aug_seeds, build_eval_loader, collate_skip, eval_transform
from ..data.decode import DeviceEvalTransform, collate_encoded
from ..data.loader import eval_shard
from ..data.sources import FileIndex
from ..runtime import dist
from ..runtime.device import autocast, memory_format
from .autochoice import channels_last_on, extraction_precision


def rng_neutral_iter(loader):
    """``iter(loader)`` without consuming the global torch RNG: a DataLoader draws a base seed when
    an iterator starts, so an extraction pass (or, in training, a mid-epoch resume) would shift every
    later draw (e.g. shuffle-BN's permutation). Samples and augmentations have their own seeds."""
    state = torch.get_rng_state()
    it = iter(loader)
    torch.set_rng_state(state)
    return it


class _SeededItems(torch.utils.data.Dataset):
    """``ds[i]`` as ``ds[(i, seed_i)]``, ``seed_i`` a hash of ``(seed, i)``: a random transform gives
    image ``i`` the same augmentation whichever rank or DataLoader worker loads it."""

    def __init__(self, ds: ImageDataset, seed: int):
        self.ds, self.seed = ds, int(seed)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[(int(i), int(aug_seeds(self.seed, 0, np.array([i]))[0]))]


def subset_index(index: FileIndex, positions: Sequence[int] | np.ndarray) -> FileIndex:
    pos = np.asarray(positions, dtype=np.int64)
    return FileIndex(
        root=index.root,
        paths=[index.paths[i] for i in pos],
        labels=np.asarray(index.labels)[pos],
        classes=list(index.classes),
    )


def same_files(index: FileIndex, what: str) -> FileIndex:
    """Distributed: raise on every rank unless every rank lists the same files for ``what`` (count
    and crc32 of the paths; the samplers and the sharded extraction index into one list)."""
    if dist.is_dist():
        digest = zlib.crc32("\n".join(index.paths).encode("utf-8", "surrogateescape"))
        dist.check_same((len(index), digest), f"{what} (count, crc32)")
    return index


@torch.no_grad()
def extract(
    fns: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
    index: FileIndex,
    transform,
    *,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 2,
    precision: str = "none",
    channels_last: bool = False,
    reporter=None,
    description: str = "features",
    aug_seed: Optional[int] = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run ``fns`` over every image; returns (list of feature tensors [N, D_i] on ``device``,
    labels [N]). Corrupt images give zero rows (and are reported by the data layer). A
    :class:`~interclr_cli.data.decode.DeviceEvalTransform` decodes each batch on ``device``.

    ``aug_seed`` (for a random ``transform``, e.g. an augmented copy): image ``i`` is transformed
    with a seed that is a function of ``(aug_seed, i)``, so the pass does not depend on the number
    of ranks or workers; without it a random transform draws from the global RNG.
    """
    on_device = isinstance(transform, DeviceEvalTransform)  # data.decode=device: workers read bytes
    ds = transform.dataset(index) if on_device else ImageDataset(index, transform, views=1)
    if aug_seed is not None:
        ds = _SeededItems(ds, aug_seed)
    world, rank = dist.world_size(), dist.rank()
    collate = collate_encoded if on_device else collate_skip
    loader = build_eval_loader(ds, batch_size, num_workers, rank=rank, world_size=world, collate_fn=collate)
    n = len(index)
    shard = eval_shard(n, rank, world)
    rows = -(-n // world) if world > 1 else n  # every shard padded to the same row count
    outs: list[torch.Tensor] | None = None
    task = reporter.task(description, total=len(loader)) if reporter is not None else None
    fmt = memory_format(channels_last)
    for batch in rng_neutral_iter(loader):
        batch = transform.decode(batch, device) if on_device else batch
        if batch["index"].numel() == 0:
            continue
        x = batch["image"].to(device, non_blocking=True).to(memory_format=fmt)
        with autocast(device, precision):
            res = fns(x)
        res = res if isinstance(res, tuple) else (res,)
        if outs is None:
            outs = [torch.zeros(rows, r.shape[1], device=device, dtype=torch.float32) for r in res]
        idx = batch["index"].to(device) - shard.start
        for o, r in zip(outs, res):
            o[idx] = r.float()
        if reporter is not None:
            reporter.update(task, advance=1)
    if reporter is not None:
        reporter.finish(task)
    if world > 1:
        # each rank holds its contiguous shard: gathering the shards in rank order gives index
        # order (a rank without a single readable image learns the widths from the others)
        widths = [
            w for w in dist.all_gather_object(None if outs is None else [o.shape[1] for o in outs]) if w is not None
        ]
        if outs is None:
            outs = [torch.zeros(rows, w, device=device, dtype=torch.float32) for w in (widths[0] if widths else [])]
        outs = [dist.all_gather_cat(o)[:n] for o in outs]
    if outs is None:
        outs = []
    labels = torch.as_tensor(np.asarray(index.labels), dtype=torch.long)
    return outs, labels


def default_eval_transform(data_cfg):
    """The evaluation transform: decoded on the device with ``data.decode=device``, else PIL's."""
    return DeviceEvalTransform(data_cfg) if data_cfg.decode == "device" else eval_transform(data_cfg)


def extract_with_config(
    fns: Callable,
    index: FileIndex,
    cfg,
    device: torch.device,
    reporter,
    description: str,
    transform=None,
    aug_seed: Optional[int] = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`extract` with the config's batch size (``eval.feature_batch_size``), workers,
    precision (``eval.precision``; ``auto``: the resolved ``train.precision``) and memory format,
    and its evaluation transform unless ``transform`` is given: sharded across the ranks of a
    distributed run, every rank gets every row in order."""
    return extract(
        fns,
        index,
        transform if transform is not None else default_eval_transform(cfg.data),
        device=device,
        batch_size=cfg.eval.feature_batch_size,
        num_workers=cfg.data.num_workers,
        precision=extraction_precision(cfg, device),
        channels_last=channels_last_on(cfg, device),
        reporter=reporter,
        description=description,
        aug_seed=aug_seed,
    )
