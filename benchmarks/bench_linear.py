"""linear-eval: the augmented path against the cached-features path.

Runs `linear-eval` on the built-in CIFAR-10 subset (5,000 train / 1,000 test images, 32 px) with a
random ResNet-18, a few epochs each way, and extrapolates to the preset's 100 epochs: the
augmented path pays a backbone forward per image per epoch, the cached path one extraction pass
and then matrix products.

    .venv/bin/python benchmarks/bench_linear.py [--epochs 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from interclr_cli.commands import run_linear_eval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint", default="random:resnet18")
    args = ap.parse_args()
    ov = [
        "data.root=builtin:cifar10-mini",
        f"device={args.device}",
        "data.num_workers=2",
        f"train.epochs={args.epochs}",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cached in (False, True):
            t0 = time.perf_counter()
            res = run_linear_eval(
                args.checkpoint,
                "linear-r18-cifar",
                ov + [f"eval.cached_features={str(cached).lower()}"],
                out=f"{tmp}/{cached}",
                force=False,
                show_progress=False,
            )
            total = time.perf_counter() - t0
            rows.append((res["mode"], total, res["top1"]))
    aug, cached = rows
    per_epoch_aug = aug[1] / args.epochs
    print(f"{'path':<16}{'seconds':>10}{'top-1':>8}   ({args.epochs} epochs, {args.checkpoint}, {args.device})")
    for mode, sec, top1 in rows:
        print(f"{mode:<16}{sec:>10.1f}{top1:>8.2f}")
    print(
        f"extrapolated to 100 epochs: augmented ~{per_epoch_aug * 100 / 60:.1f} min; cached ~{cached[1] / 60:.1f} min "
        "(extraction dominates; the epochs on cached features take seconds)"
    )


if __name__ == "__main__":
    main()
