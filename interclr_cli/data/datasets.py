"""The image data set and its skip-corrupt collate function.

``ImageDataset[(i, aug_seed)]`` reseeds torch's RNG with ``aug_seed`` (inside ``fork_rng``, so
the caller's RNG state is untouched) before running the transform(s): the views of image ``i``
are a pure function of ``(i, aug_seed)``, whichever DataLoader worker loads them. This is what
makes a killed-and-resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from .sources import FileIndex

log = logging.getLogger("interclr.data")

_warned: set[str] = set()  # files already reported as unreadable by this process


def warn_unreadable(path: str, error: Exception) -> None:
    """Report ``path`` as unreadable (skipped), once per file per process."""
    if path not in _warned:
        _warned.add(path)
        log.warning("skipping unreadable image %s (%s)", path, error)


def load_rgb(path: str) -> Optional[Image.Image]:
    """The image as RGB, or None (with one warning per file per process) if it cannot be read."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except Exception as e:  # PIL raises many types on damaged files; this block only decodes
        warn_unreadable(path, e)
        return None


class ImageDataset(Dataset):
    """Images of a :class:`FileIndex` with ``views`` augmented views each.

    ``transform`` is one callable used for every view, or a sequence with one per view. A key is
    an index ``i`` (transforms use the current RNG) or ``(i, aug_seed)`` (deterministic). Items
    are ``{"view1", "view2", "index", "label"}`` for ``views=2``, ``{"image", "index", "label"}``
    for ``views=1``, or None when the file is unreadable (:func:`collate_skip` drops it).

    ``substitute=True`` (distributed training, where every rank must run every step on a batch
    of the same size): an unreadable image is replaced by the next readable one in index order
    (wrapping around, at most ``MAX_SUBSTITUTE_TRIES`` files), and the item carries
    ``replaced=1`` so that :func:`collate_skip` still counts the unreadable file as skipped.

    ``load``: path -> image or None (unreadable); :func:`load_rgb` by default (``data.decode=device``
    passes one that reads the file's bytes only, :func:`~interclr_cli.data.decode.read_encoded`).
    """

    MAX_SUBSTITUTE_TRIES = 1000

    def __init__(
        self,
        index: FileIndex,
        transform: Union[Callable, Sequence[Callable]],
        views: int = 2,
        substitute: bool = False,
        load: Callable[[str], object] = load_rgb,
    ):
        if views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {views}")
        if callable(transform):
            self.transforms = [transform] * views
        else:
            self.transforms = list(transform)
            if len(self.transforms) != views:
                raise ValueError(f"got {len(self.transforms)} transforms for {views} views")
        self.views = views
        self.substitute = substitute
        self.load = load
        self.root = index.root
        self.classes = list(index.classes)
        self.labels = np.asarray(index.labels, dtype=np.int64)
        # Paths as one byte buffer + offsets rather than a list of str: forked DataLoader workers
        # would otherwise touch (and so copy) every string's refcount page by page.
        encoded = [p.encode("utf-8", "surrogateescape") for p in index.paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._buf = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        """The file path of image ``i``."""
        a, b = self._offsets[i], self._offsets[i + 1]
        return self._buf[a:b].tobytes().decode("utf-8", "surrogateescape")

    def __getitem__(self, key) -> Optional[dict]:
        if isinstance(key, (tuple, list)):
            i, aug_seed = int(key[0]), int(key[1])
        else:
            i, aug_seed = int(key), None
        img, replaced = self.load(self.path(i)), False
        if img is None and self.substitute:
            found = self._next_readable(i)
            if found is not None:
                (img, i), replaced = found, True
        if img is None:
            return None
        if aug_seed is None:
            out = [t(img) for t in self.transforms]
        else:
            with torch.random.fork_rng(devices=[]):
                # Only the CPU generator: torch.manual_seed would also reseed (and, outside
                # fork_rng's reach, clobber) the CUDA generators of the main process.
                torch.default_generator.manual_seed(aug_seed)
                out = [t(img) for t in self.transforms]
        item = {"view1": out[0], "view2": out[1]} if self.views == 2 else {"image": out[0]}
        item["index"] = i
        item["label"] = int(self.labels[i])
        if replaced:
            item["replaced"] = 1
        return item

    def _next_readable(self, i: int) -> Optional[tuple[Image.Image, int]]:
        """(image, index) of the first readable file after ``i`` in index order, or None."""
        n = len(self)
        for step in range(1, min(n, self.MAX_SUBSTITUTE_TRIES + 1)):
            j = (i + step) % n
            img = self.load(self.path(j))
            if img is not None:
                return img, j
        return None


def split_skipped(samples: list[Optional[dict]]) -> tuple[list[dict], int]:
    """The readable samples (without their ``replaced`` mark) and how many files were skipped:
    the unreadable (None) ones and those replaced by another image (``ImageDataset(substitute=True)``)."""
    kept = [s for s in samples if s is not None]
    skipped = len(samples) - len(kept) + sum(1 for s in kept if "replaced" in s)
    kept = [{k: v for k, v in s.items() if k != "replaced"} if "replaced" in s else s for s in kept]
    return kept, skipped


def collate_skip(samples: list[Optional[dict]]) -> dict:
    """Stack the readable samples; ``skipped`` counts the dropped (None) ones.

    ``index`` and ``label`` are int64 tensors. If every sample was unreadable, the batch has 0
    rows and only ``index``, ``label`` (empty) and ``skipped``: check ``batch["index"].numel()``
    and skip the step.
    """
    kept, skipped = split_skipped(samples)
    if not kept:
        empty = torch.zeros(0, dtype=torch.int64)
        return {"index": empty, "label": empty.clone(), "skipped": skipped}
    batch = default_collate(kept)
    batch["index"] = batch["index"].to(torch.int64)
    batch["label"] = batch["label"].to(torch.int64)
    batch["skipped"] = skipped
    return batch
