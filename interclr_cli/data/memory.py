"""``data.in_memory``: every image decoded once and kept as uint8 pixels on the training device.

For small data sets whose images share one size (CIFAR-like: 50,000 x 32 x 32 x 3 = 150 MB).
With ``data.augment_on=device`` a training step then gathers its images from this tensor and
augments them batched (:meth:`DeviceAugment.from_images`): no decoding, no PIL, no workers.

An unreadable file is reported once, like the file loader does, and its rows are served by the
next readable image in index order (the step keeps its full batch; the batch counts it as
skipped), the rule distributed training uses for the file loader too.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import UserError
from .datasets import ImageDataset, load_rgb

log = logging.getLogger("interclr.data")


class InMemoryImages:
    """uint8 images [N, 3, H, W] on ``device`` plus the readable-substitute map ``src`` [N]."""

    def __init__(self, dataset: ImageDataset, device: torch.device):
        n = len(dataset)
        arrays: list[np.ndarray | None] = []
        shape = None
        for i in range(n):
            img = load_rgb(dataset.path(i))
            if img is None:
                arrays.append(None)
            else:
                a = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
                if shape is None:
                    shape = a.shape
                elif a.shape != shape:
                    raise UserError(
                        f"data.in_memory needs images of one size: {dataset.path(i)} is {a.shape[1]}x{a.shape[0]}, "
                        f"others {shape[1]}x{shape[0]}; resize the data set or set data.in_memory=false"
                    )
                arrays.append(a)
        ok = np.array([a is not None for a in arrays])
        if not ok.any():
            raise UserError("data.in_memory: no image of the data set could be read; check data.root")
        blank = np.zeros(shape, np.uint8)
        stacked = np.stack([a if a is not None else blank for a in arrays])  # [N, H, W, 3]
        self.images = torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous().to(device)  # [N, 3, H, W]
        self.ok = ok
        # src[i]: i when readable, else the next readable index (wrapping around)
        readable = np.flatnonzero(ok)
        nxt = np.searchsorted(readable, np.arange(n))
        self.src = np.where(ok, np.arange(n), readable[nxt % len(readable)])
        self.labels = torch.as_tensor(dataset.labels, dtype=torch.long)
        log.info(
            "data.in_memory: %d images of %dx%d, %.1f MB on %s",
            n,
            shape[1],
            shape[0],
            self.images.numel() / 2**20,
            device,
        )

    def __len__(self) -> int:
        return len(self.src)

    def batch(self, keys) -> dict:
        """The batch for a sampler's ``[(index, seed), ...]``: uint8 images, indices, labels, skipped."""
        idx = np.fromiter((int(k[0]) if isinstance(k, (tuple, list)) else int(k) for k in keys), dtype=np.int64)
        src = self.src[idx]
        skipped = int((~self.ok[idx]).sum())
        src_t = torch.from_numpy(src)
        return {
            "images": self.images[src_t.to(self.images.device)],
            "index": torch.from_numpy(src),
            "label": self.labels[src_t],
            "skipped": skipped,
        }
