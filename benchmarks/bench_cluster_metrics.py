"""Clustering metrics: our former NMI/ARI/AMI code against scikit-learn's, at the sizes users hit.

``interclr_cli.eval.metrics`` used to compute NMI, ARI and AMI itself (AMI with an expected mutual
information summed over distinct pairs of cluster sizes, in a +-40 sd window of each
hypergeometric); it now calls scikit-learn. This times both side by side on synthetic labelings
(class-correlated clusters with log-normal sizes plus 50% noise) and checks that the values
agree. "ours" is loaded from the commit that still had the code (``--ours-rev``, via
``git show``), "sklearn" is ``sklearn.metrics``; ``report`` is today's
:func:`~interclr_cli.eval.metrics.cluster_report` (all metrics, Hungarian matching included).

    .venv/bin/python benchmarks/bench_cluster_metrics.py [--skip-large] [--ours-rev c40b04f]

Sizes: CIFAR-10 mini (5,000 / 10 classes / k = 10), CIFAR-10 train (50,000 / 10 / 10), ImageNet
val (50,000 / 1,000 / 1,000) and InterCLR's clusters on ImageNet train (1,281,167 / 1,000 /
10,000; scikit-learn's AMI takes about 40 s there on one core).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from interclr_cli.eval.metrics import cluster_report

ROOT = Path(__file__).resolve().parents[1]
SIZES = [
    ("cifar10-mini", 5_000, 10, 10),
    ("cifar10-train", 50_000, 10, 10),
    ("imagenet-val", 50_000, 1_000, 1_000),
    ("imagenet-train", 1_281_167, 1_000, 10_000),
]


def load_ours(rev: str):
    """The metrics module as of ``rev``, imported as ``interclr_cli.eval._metrics_<rev>``."""
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:interclr_cli/eval/metrics.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "metrics_old.py"
    path.write_text(src)
    name = f"interclr_cli.eval._metrics_{rev}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # relative imports (..errors) resolve inside interclr_cli
    spec.loader.exec_module(mod)
    return mod


def labelings(n: int, classes: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = rng.integers(0, classes, n)
    w = rng.lognormal(0.0, 0.7, k)
    p = rng.choice(k, n, p=w / w.sum())
    keep = rng.random(n) > 0.5
    per = max(k // classes, 1)
    p[keep] = (t[keep] * per + rng.integers(0, per, int(keep.sum()))) % k
    return t, p


def timed(fn, *args) -> tuple[float, float]:
    t0 = time.perf_counter()
    v = fn(*args)
    return float(v), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-large", action="store_true", help="leave out ImageNet train (sklearn AMI ~40 s)")
    ap.add_argument("--ours-rev", default="c40b04f", help="commit with the former NMI/ARI/AMI code")
    args = ap.parse_args()
    ours = load_ours(args.ours_rev)
    pairs = [
        ("nmi", ours.nmi, skm.normalized_mutual_info_score),
        ("ari", ours.ari, skm.adjusted_rand_score),
        ("ami", ours.ami, skm.adjusted_mutual_info_score),
    ]
    print(
        f"{'size':>15} {'N':>9} {'cls':>5} {'k':>6} {'metric':>6} {'ours s':>8} {'sklearn s':>9} "
        f"{'ratio':>7} {'|diff|':>8}"
    )
    for name, n, classes, k in SIZES:
        if args.skip_large and n > 100_000:
            continue
        t, p = labelings(n, classes, k)
        for metric, f_ours, f_sk in pairs:
            v_o, s_o = timed(f_ours, t, p)
            v_s, s_s = timed(f_sk, t, p)
            print(
                f"{name:>15} {n:>9} {classes:>5} {k:>6} {metric:>6} {s_o:>8.3f} {s_s:>9.3f} "
                f"{s_s / max(s_o, 1e-9):>6.1f}x {abs(v_o - v_s):>8.1e}",
                flush=True,
            )
        t0 = time.perf_counter()
        cluster_report(t, p)
        print(
            f"{name:>15} cluster_report (sklearn NMI/ARI/AMI + purity + Hungarian): {time.perf_counter() - t0:.3f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
