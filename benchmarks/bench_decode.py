"""Pretraining data path per core: ``data.decode=device`` against PIL in the workers, side by side.

Real CIFAR-10 JPEGs (../shared/data/cifar10/train, 32 x 32), two views per image, one torch
thread and no DataLoader workers, so each figure is what one core delivers (the training device
is that core too). Paths, each timed over the same images, interleaved, median of ``--reps``:

- ``pil_full``: ``augment_on=workers``, the whole MoCo v2 recipe with PIL;
- ``pil_crop``: ``decode=pil, augment_on=device`` without the colour ops: PIL decode,
  RandomResizedCrop and flip to uint8 views, then normalisation;
- ``device_crop``: ``decode=device`` without the colour ops: bytes read, ``decode_jpeg`` of the
  batch, crops resized and flipped by two batched matrix products, normalisation;
- ``pil_crop_colour`` / ``device_crop_colour``: the last two with the colour, grey and blur ops
  on the device (``DeviceAugment``), i.e. the two ``augment_on=device`` pipelines in full;
- ``device_crop_colour_whole``: ``device_crop_colour`` with the colour ops over the whole batch
  at once instead of the CPU's cache-sized blocks (``device_aug.CPU_BLOCK_BYTES``), as a GPU runs
  them (``ratio_blocks``: blocks / whole batch).

Prints one JSON object: img/s per path and size, and the ratios decode=device / decode=pil.

    python benchmarks/bench_decode.py
    python benchmarks/bench_decode.py --sizes 32 --images 1024 --reps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from interclr_cli.config.schema import DataConfig
from interclr_cli.data import (
    DeviceAugment,
    EpochBatchSampler,
    FileIndex,
    ImageDataset,
    crop_flip_transform,
    device_aug,
    loader_from_config,
    moco_v2_transform,
)
from interclr_cli.data.decode import device_decoded_loader

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "train"
NO_COLOUR = {"color_jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}


def _index(n: int) -> FileIndex:
    classes = sorted(p.name for p in DATA.iterdir() if p.is_dir())
    per = -(-n // len(classes))
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = sorted((DATA / c).glob("*.jpg"))[:per]
        paths += [str(p) for p in files]
        labels += [k] * len(files)
    return FileIndex(root=DATA, paths=paths[:n], labels=np.array(labels[:n]), classes=classes)


def _pipelines(index: FileIndex, size: int, batch: int) -> dict:
    """name -> a function that runs one epoch of two-view batches and returns the images it made."""
    cpu = torch.device("cpu")
    base = DataConfig(image_size=size, augment_on="device", num_workers=0)
    plain = dataclasses.replace(base, **NO_COLOUR)

    def sampler():
        s = EpochBatchSampler(len(index), batch, replacement=False, seed=0)
        s.set_epoch(0)
        return s

    def pil(cfg, transform, augment):
        def run():
            n = 0
            for b in loader_from_config(ImageDataset(index, transform, views=2), sampler(), cfg):
                for v, key in enumerate(("view1", "view2")):
                    if augment is not None:
                        augment(b[key], epoch=0, step_in_epoch=0, view=v)
                n += b["index"].numel()
            return n

        return run

    def device(cfg, block_bytes=device_aug.CPU_BLOCK_BYTES):
        augment = DeviceAugment(cfg, cpu, seed=0)

        def run():
            n, kept = 0, device_aug.CPU_BLOCK_BYTES
            device_aug.CPU_BLOCK_BYTES = block_bytes
            try:
                for b in device_decoded_loader(index, sampler(), dataclasses.replace(cfg, decode="device"), cpu):
                    for v in range(2):
                        augment.from_images(b["images"], epoch=0, step_in_epoch=0, view=v)
                    n += b["index"].numel()
            finally:
                device_aug.CPU_BLOCK_BYTES = kept
            return n

        return run

    return {
        "pil_full": pil(base, moco_v2_transform(base), None),
        "pil_crop": pil(plain, crop_flip_transform(plain), DeviceAugment(plain, cpu, seed=0)),
        "device_crop": device(plain),
        "pil_crop_colour": pil(base, crop_flip_transform(base), DeviceAugment(base, cpu, seed=0)),
        "device_crop_colour": device(base),
        "device_crop_colour_whole": device(base, block_bytes=1 << 62),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--images", type=int, default=512, help="images per timed pass at 32 px (a quarter at 224)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)  # one core: per-core figures
    res: dict = {"threads": 1, "workers": 0, "batch": a.batch}
    for size in a.sizes:
        n = a.images if size <= 64 else max(a.batch, a.images // 4)
        runs = _pipelines(_index(n), size, a.batch)
        times: dict = {k: [] for k in runs}
        for fn in runs.values():  # warm-up (and the image count)
            res[f"images_{size}"] = fn()
        for _ in range(a.reps):  # interleaved: every path sees the same machine load
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        for name in runs:
            res[f"{name}_{size}_img_s"] = round(res[f"images_{size}"] / statistics.median(times[name]), 1)
        res[f"ratio_crop_{size}"] = round(res[f"device_crop_{size}_img_s"] / res[f"pil_crop_{size}_img_s"], 2)
        res[f"ratio_colour_{size}"] = round(
            res[f"device_crop_colour_{size}_img_s"] / res[f"pil_crop_colour_{size}_img_s"], 2
        )
        res[f"ratio_blocks_{size}"] = round(
            res[f"device_crop_colour_{size}_img_s"] / res[f"device_crop_colour_whole_{size}_img_s"], 2
        )
        res[f"ratio_device_colour_vs_pil_full_{size}"] = round(
            res[f"device_crop_colour_{size}_img_s"] / res[f"pil_full_{size}_img_s"], 2
        )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
