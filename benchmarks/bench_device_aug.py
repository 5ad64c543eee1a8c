"""Device colour jitter (interclr_cli/data/device_aug.py): the old masked algorithm against today's.

The old ``DeviceAugment.apply`` evaluated all four colour ops on the whole batch in each of the
four order slots and kept, per image, the one whose turn it was (16 ops' work for 4); today's
:func:`color_jitter` runs each op once per image. Both run on the same batch and parameters,
interleaved; the script prints, per view, the aten op count and the bytes of every op's outputs
(a ``TorchDispatchMode`` counter), the median CPU time, their ratios and the largest difference
of the two results, as one JSON object.

    python benchmarks/bench_device_aug.py                  # B=256, 224 px
    python benchmarks/bench_device_aug.py --batch 64 --size 96 --reps 5

``--blocks N ...`` instead times the whole device half (``DeviceAugment._finish``: draw, colour
ops, normalisation) with the CPU's blocks set to N images each (``CPU_BLOCK_BYTES``), in ms per
view, interleaved, median of ``--reps``:

    python benchmarks/bench_device_aug.py --blocks 64 16 8 4 2 1 --batch 64 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from interclr_cli.config.schema import DataConfig
from interclr_cli.data import device_aug as D


def old_apply(aug: D.DeviceAugment, x: torch.Tensor, prm: dict) -> torch.Tensor:
    """The algorithm before issue 12 (kept here only, for comparison): every op in every slot, masked."""
    c = aug.cfg
    if c.color_jitter_p > 0:
        y = x
        for slot in range(4):
            op_here = prm["order"][:, slot].view(-1, 1, 1, 1)
            y = sum(torch.where(op_here == k, op(y, prm["factors"][:, k]), 0.0) for k, op in enumerate(D._OPS))
        x = torch.where(prm["jitter_on"], y, x)
    if c.grayscale_p > 0:
        x = torch.where(prm["gray_on"], D.grayscale(x).expand_as(x), x)
    if c.blur_p > 0:
        x = torch.where(prm["blur_on"], D.gaussian_blur(x, prm["sigma"], aug.kernel), x)
    return x


class OpCounter(TorchDispatchMode):
    """Counts aten ops and the bytes of their tensor outputs."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


def time_blocks(batch: int, size: int, blocks: list[int], reps: int) -> dict:
    """ms per view of ``DeviceAugment._finish`` for each number of images per CPU block."""
    aug = D.DeviceAugment(DataConfig(image_size=size), torch.device("cpu"), seed=0)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    per_image, kept = 3 * size * size * 4, D.CPU_BLOCK_BYTES
    times: dict = {b: [] for b in blocks}
    try:
        with torch.no_grad():
            for rep in range(reps + 1):  # the first pass warms up
                for b in blocks:
                    D.CPU_BLOCK_BYTES = b * per_image
                    aug.gen.manual_seed(1)
                    y = x.clone()
                    t0 = time.perf_counter()
                    aug._finish(y)
                    if rep:
                        times[b].append(time.perf_counter() - t0)
    finally:
        D.CPU_BLOCK_BYTES = kept
    res: dict = {"batch": batch, "size": size, "threads": torch.get_num_threads(), "default_block": kept // per_image}
    for b in blocks:
        res[f"block_{b}_ms_per_view"] = round(statistics.median(times[b]) / batch * 1e3, 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--blocks", type=int, nargs="*", default=None, help="images per CPU block to compare")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.blocks:
        print(json.dumps(time_blocks(a.batch, a.size, a.blocks, a.reps)))
        return
    aug = D.DeviceAugment(DataConfig(image_size=a.size), torch.device("cpu"), seed=0)
    x = torch.rand(a.batch, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    aug.gen.manual_seed(1)
    prm = aug.draw(a.batch)
    algos = {"old": lambda: old_apply(aug, x, prm), "new": lambda: aug.apply(x, prm)}
    res: dict = {"batch": a.batch, "size": a.size, "threads": torch.get_num_threads()}
    outs = {}
    for name, fn in algos.items():
        with torch.no_grad(), OpCounter() as cnt:
            outs[name] = fn()
        res[f"{name}_aten_ops"], res[f"{name}_gb"] = cnt.ops, round(cnt.bytes / 1e9, 2)
    res["max_abs_diff"] = float((outs["old"] - outs["new"]).abs().max())
    del outs
    times: dict = {k: [] for k in algos}
    with torch.no_grad():
        for _ in range(a.reps):  # interleaved: both see the same machine load
            for name, fn in algos.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    for name in algos:
        res[f"{name}_s"] = round(statistics.median(times[name]), 3)
    res["speedup"] = round(res["old_s"] / res["new_s"], 2)
    res["ops_ratio"] = round(res["old_aten_ops"] / res["new_aten_ops"], 2)
    res["bytes_ratio"] = round(res["old_gb"] / res["new_gb"], 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
