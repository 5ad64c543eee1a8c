"""Time indexing an ImageNet-sized ImageFolder tree: a full scan versus loading the run's cache.

Generates a synthetic tree of empty ``.JPEG`` files (default 1000 class folders x 1281 files,
1.28M in all, like ImageNet-1k train; indexing never opens a file, so empty ones suffice), then
times ``index_source`` without a cache, with a cache to write, and with that cache to load.
The OS's directory cache is warm after generation, so "scan" is the best case of a cold scan.

    python benchmarks/bench_file_index.py [--dirs 1000] [--files 1281] [--where /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from interclr_cli.data.sources import index_source  # noqa: E402


def make_tree(root: Path, dirs: int, files: int) -> None:
    for d in range(dirs):
        cls = root / f"n{d:08d}"
        cls.mkdir(parents=True)
        for i in range(files):
            os.close(os.open(cls / f"n{d:08d}_{i}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))


def timed(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dirs", type=int, default=1000)
    ap.add_argument("--files", type=int, default=1281, help="files per folder")
    ap.add_argument("--where", default=tempfile.gettempdir(), help="parent folder for the synthetic tree")
    ap.add_argument("--repeat", type=int, default=3, help="take the best of this many runs")
    ap.add_argument("--keep", action="store_true", help="keep the tree (and reuse it next time)")
    args = ap.parse_args()

    root = Path(args.where) / f"interclr-bench-{args.dirs}x{args.files}"
    cache = root.parent / f"{root.name}.index"
    if not (root.is_dir() and args.keep):
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        make_tree(root, args.dirs, args.files)
        print(f"generated {args.dirs * args.files:,} files in {time.perf_counter() - t0:.1f}s under {root}")
    try:
        scan, idx = timed(lambda: index_source(str(root)), args.repeat)

        def scan_and_write():
            cache.unlink(missing_ok=True)
            return index_source(str(root), cache_path=cache)

        write, _ = timed(scan_and_write, args.repeat)
        load, cached = timed(lambda: index_source(str(root), cache_path=cache), args.repeat)
        assert cached.paths == idx.paths and (cached.labels == idx.labels).all()
        n = len(idx)
        print(f"images:            {n:,} in {len(idx.classes)} classes")
        print(f"scan (no cache):   {scan:.3f}s  ({n / scan / 1e6:.2f}M files/s, best of {args.repeat})")
        print(f"scan + write cache: {write:.3f}s  (cache {cache.stat().st_size / 2**20:.1f} MiB)")
        print(f"cached load:       {load:.3f}s  (best of {args.repeat})")
        print(f"scan / cached:     {scan / load:.1f}x")
    finally:
        cache.unlink(missing_ok=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
