"""The seed methods side by side: kNN top-1 per epoch at the quickstart budget, and step times.

``--knn``: ``interclr pretrain --preset quickstart monitor.every=1`` (the built-in 5,000 CIFAR-10
images, ResNet-18 at 16 px, batch 64, 12 epochs, seed 0) for each method, one after the other,
and the kNN top-1 (k = 200, backbone features, 1,000 test images) at initialisation and after
every epoch, read from each run's ``metrics.jsonl``; one Markdown table.

``--steps``: one training step (forward, backward, SGD step, post-step maintenance) of each
method on the same random batch (ResNet-18 small stem, 32 px, batch 128, N = 5,000, CPU),
repetitions interleaved, medians, each relative to MoCo v2 measured in the same run.

    python benchmarks/bench_methods.py --knn --out runs/bench-methods        # about 6 x 4 min on 2 cores
    python benchmarks/bench_methods.py --knn --only npid invp npid-cld --epochs 4 --out runs/bench-methods
    python benchmarks/bench_methods.py --steps --reps 3

The per-method overrides scale the CIFAR settings to N = 5,000 and batch 64 (listed in METHODS).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from bench_step import make_step, timeit

from interclr_cli.config import load_config

# name -> overrides on the quickstart preset (InterCLR: the preset itself)
METHODS: dict[str, list[str]] = {
    "MoCo v2": ["method.name=mocov2"],
    "NPID": ["method.name=npid"],
    # 4,096 of 50,000 CIFAR images as background -> 410 of 5,000; the ramp after 2 of 12 epochs
    "InvP": [
        "method.name=invp",
        "method.invp.num_background=410",
        "method.invp.n_pos=20",
        "method.invp.ramp_epochs=2",
    ],
    "InterCLR": [],
    # the CIFAR scripts' K / batch (200 / 256 and 128 / 256) at batch 64
    "MoCo v2 + CLD": [
        "method.name=mocov2",
        "method.cld.weight=0.8",
        "method.cld.num_clusters=50",
        "method.cld.temperature=0.2",
    ],
    "NPID + CLD": [
        "method.name=npid",
        "method.cld.weight=1.0",
        "method.cld.num_clusters=32",
        "method.cld.temperature=0.2",
        "method.cld.normlinear=false",
    ],
}


def slug(name: str) -> str:
    """``MoCo v2 + CLD`` -> ``mocov2-cld`` (run folder names, ``--only``)."""
    return name.lower().replace(" + ", "-").replace(" ", "")


def knn_curve(run_dir: Path) -> list[float]:
    """kNN top-1 of the monitor records (initialisation, then each epoch) of a run."""
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["knn_top1"] for r in recs if "knn_top1" in r]


def run_knn(names: list[str], out: Path, seed: int, epochs: int) -> dict[str, list[float]]:
    curves = {}
    for name in names:
        run_dir = out / slug(name) / f"seed{seed}"
        cmd = [sys.executable, "-m", "interclr_cli", "pretrain", "--preset", "quickstart", "--force", "--quiet"]
        cmd += ["--out", str(run_dir), "monitor.every=1", f"seed={seed}", *METHODS[name]]
        cmd += [f"train.epochs={epochs}"] if epochs else []
        print("$ interclr " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # stdout: the table only
        curves[name] = knn_curve(run_dir)
        print(f"{name}: {curves[name]}", file=sys.stderr, flush=True)
    return curves


def print_table(curves: dict[str, list[float]]) -> None:
    epochs = max(len(c) for c in curves.values())
    print("| method | init | " + " | ".join(str(e) for e in range(1, epochs)) + " | gain |")
    print("|---|" + "---|" * (epochs + 1))
    for name, c in curves.items():
        cells = " | ".join(f"{v:.1f}" for v in c)
        print(f"| {name} | {cells} | {c[-1] - c[0]:+.1f} |")


def run_steps(reps: int, warmup: int) -> dict[str, float]:
    common = ["device=cpu", "data.image_size=32", "model.small_stem=true", "train.batch_size=128"]
    n, b = 5000, 128
    torch.manual_seed(0)
    batch = {
        "view1": torch.randn(b, 3, 32, 32),
        "view2": torch.randn(b, 3, 32, 32),
        "index": torch.randperm(n)[:b],
        "label": torch.full((b,), -1),
    }
    fns = {name: make_step(load_config("quickstart", common + ov), n, batch) for name, ov in METHODS.items()}
    res = timeit(fns, reps, warmup)
    print(f"threads {torch.get_num_threads()}  ResNet-18 small stem, 32 px, batch {b}, N {n}", file=sys.stderr)
    print("| method | ms/step | relative to MoCo v2 |")
    print("|---|---|---|")
    for name, sec in res.items():
        print(f"| {name} | {sec * 1000:.0f} | {sec / res['MoCo v2']:.2f} |")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--knn", action="store_true")
    ap.add_argument("--steps", action="store_true")
    ap.add_argument(
        "--only", nargs="*", default=None, help="mocov2 npid invp interclr mocov2-cld npid-cld (default: all)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=0, help="train.epochs (default: the quickstart's 12)")
    ap.add_argument("--out", default="runs/bench-methods")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args()
    if a.knn:
        names = [n for n in METHODS if a.only is None or slug(n) in a.only]
        curves = run_knn(names, Path(a.out), a.seed, a.epochs)
        print_table(curves)
        print(json.dumps(curves), file=sys.stderr)
    if a.steps:
        print(json.dumps(run_steps(a.reps, a.warmup)), file=sys.stderr)


if __name__ == "__main__":
    main()
