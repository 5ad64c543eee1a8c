"""Whole pretraining runs on the CPU: ``data.decode=device`` against PIL augmentation, side by side.

Where ``bench_decode.py`` times the data path alone, this times ``interclr pretrain`` itself (the
model's steps included; the quickstart preset with ``data.in_memory=false``) on the built-in
CIFAR-10 JPEGs, for each path in turn, interleaved over
``--reps`` rounds, and reads the steady-state rate from each run's ``metrics.jsonl`` (the median
``img_per_s`` of the step records after the first ``--skip`` steps). Paths:

- ``workers0``: ``data.augment_on=workers`` with ``data.num_workers=0`` (PIL in the training
  process);
- ``workers2``: the same with 2 DataLoader worker processes;
- ``device``: ``data.decode=device`` (workers only read bytes; decode, crop and colour ops batched
  in the training process) with 0 workers.

Prints one JSON object: img/s per path and size and the ratios to ``workers0`` and ``workers2``.

    python benchmarks/bench_pretrain_decode.py                         # 32 and 224 px
    python benchmarks/bench_pretrain_decode.py --sizes 224 --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PATHS = {
    "workers0": ["data.augment_on=workers", "data.num_workers=0"],
    "workers2": ["data.augment_on=workers", "data.num_workers=2"],
    "device": ["data.decode=device", "data.num_workers=0"],
}


def size_overrides(size: int) -> list[str]:
    """The quickstart at ``size`` px: the small stem up to 64 px, a smaller batch and fewer steps at 224."""
    if size <= 64:
        return [f"data.image_size={size}", "train.max_steps=60", "train.log_every=5"]
    return [
        f"data.image_size={size}",
        "model.small_stem=false",
        "train.global_batch=32",
        "train.max_steps=14",
        "train.log_every=2",
    ]


def rate(run_dir: Path, skip: int) -> float:
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["img_per_s"] for r in recs if r.get("type") == "step" and r["step"] > skip]
    return statistics.median(steps)


def run(path: str, size: int, out: Path, skip: int) -> float:
    cmd = [sys.executable, "-m", "interclr_cli", "pretrain", "--preset", "quickstart", "--force", "--quiet"]
    cmd += ["--out", str(out), "device=cpu", "monitor.every=0", "data.in_memory=false", *size_overrides(size)]
    cmd += PATHS[path]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return rate(out, skip)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--skip", type=int, default=4, help="steps left out of each run's rate (warm-up)")
    a = ap.parse_args()
    res: dict = {"cores": "all (torch's default threads)"}
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes:
            rates: dict = {p: [] for p in PATHS}
            for rep in range(a.reps):  # interleaved: every path sees the same machine load
                for p in PATHS:
                    rates[p].append(run(p, size, Path(tmp) / f"{p}-{size}-{rep}", a.skip))
            for p in PATHS:
                res[f"{p}_{size}_img_s"] = round(statistics.median(rates[p]), 1)
            for base in ("workers0", "workers2"):
                res[f"ratio_device_vs_{base}_{size}"] = round(
                    res[f"device_{size}_img_s"] / res[f"{base}_{size}_img_s"], 2
                )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
