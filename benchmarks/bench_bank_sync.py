"""Bytes each rank sends per step to keep the InterCLR memory bank replicated, vs broadcasting it.

Two gloo ranks on the CPU (spawned here), the ImageNet bank (N = 1,281,167 rows, D = 128, float32,
656 MB per rank). Per step, for a batch of B images per rank:

* ``sync``: what InterCLR does (``methods/interclr.py``, ``after_optimizer_step``): all-gather the
  step's indices (int64) and L2-normalised keys (float32); every rank then applies the same update,
  relabels the batch and maintains the clusters locally, identically;
* ``sync+labels``: the same plus the batch's labels (int64), for a design that ships labels too;
* ``broadcast``: rank 0 broadcasts the whole bank (features, plus the N int64 labels) instead.

The bytes are measured (``wchar`` of /proc/self/io: the bytes the process handed to write-like
system calls, which under gloo is its socket traffic) and compared with the payload arithmetic.
Then the real method: an InterCLR instance (ResNet-18 encoders, the same N) runs
``after_optimizer_step`` for a few steps on both ranks (queue enqueue + bank update + online labels,
K = 10,000) and the banks, labels and centroids are checked bit-identical.

    python benchmarks/bench_bank_sync.py                 # B = 32 per rank (the 8 x 32 reference)
    python benchmarks/bench_bank_sync.py --batch 256 --json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp
from _helpers import bytes_written, random_init_state

N_IMAGENET = 1_281_167


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(fn, reps: int) -> tuple[int, float]:
    """(median bytes written, median seconds) of ``fn`` on this rank."""
    from interclr_cli.runtime import dist

    sent, secs = [], []
    for _ in range(reps):
        dist.barrier()
        b0, t0 = bytes_written(), time.perf_counter()
        fn()
        t1, b1 = time.perf_counter(), bytes_written()
        sent.append(b1 - b0)
        secs.append(t1 - t0)
    return int(statistics.median(sent)), statistics.median(secs)


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    import torch.nn.functional as F

    from interclr_cli.runtime import dist, launch

    launch.init_distributed()
    n, d, b = args.num_samples, args.dim, args.batch
    res: dict = {"rank": rank}
    g = torch.Generator().manual_seed(rank)
    idx = torch.randint(0, n, (b,), generator=g)
    keys = F.normalize(torch.randn(b, d, generator=g), dim=1)
    labels = torch.randint(0, 10000, (b,), generator=g)

    def sync():
        dist.all_gather_cat(idx)
        dist.all_gather_cat(keys)

    def sync_labels():
        sync()
        dist.all_gather_cat(labels)

    res["sync"] = _measure(sync, args.reps)
    res["sync+labels"] = _measure(sync_labels, args.reps)

    bank = F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(0)), dim=1)
    bank_labels = torch.zeros(n, dtype=torch.long)

    def broadcast():
        dist.broadcast_(bank, 0)
        dist.broadcast_(bank_labels, 0)

    res["broadcast"] = _measure(broadcast, max(1, args.reps // 10))
    bank = bank_labels = None  # free them before the next measurement

    if not args.skip_method:
        res["method"] = _run_method(args, rank)
    torch.save(res, f"{out}.{rank}")
    launch.teardown()


def _run_method(args, rank: int) -> dict:
    """A few ``after_optimizer_step`` calls of the real InterCLR on both ranks."""
    import torch.nn.functional as F

    from interclr_cli.config import load_config
    from interclr_cli.methods import build_method
    from interclr_cli.runtime import dist

    cfg = load_config("r50-imagenet", ["model.arch=resnet18", "model.head_hidden=512", "device=cpu"])
    torch.manual_seed(0)
    method = build_method(cfg, args.num_samples)
    random_init_state(method)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    sent, secs = [], []
    for step in range(args.method_steps):
        idx = torch.randint(0, args.num_samples, (args.batch,), generator=g)
        keys = F.normalize(torch.randn(args.batch, cfg.model.embed_dim, generator=g), dim=1)
        method._pending_keys, method._pending_bank = keys, (idx, keys)
        dist.barrier()
        b0, t0 = bytes_written(), time.perf_counter()
        method.after_optimizer_step(step)
        secs.append(time.perf_counter() - t0)
        sent.append(bytes_written() - b0)
    from interclr_cli.runtime.ddp import check_replicas

    differ = check_replicas(method)  # float64 checksums of every parameter and buffer, compared
    return {
        "bytes_per_step": int(statistics.median(sent)),
        "seconds_per_step": statistics.median(secs),
        "identical": not differ,
        "differ": differ,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=N_IMAGENET)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32, help="images per rank per step")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--method-steps", type=int, default=5)
    ap.add_argument("--skip-method", action="store_true", help="only the collectives, not the real InterCLR step")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res")
        mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
        res = [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]
    n, d, b = args.num_samples, args.dim, args.batch
    payload_sync = b * 8 + b * d * 4  # indices + keys, each rank, sent to the 1 other rank
    payload_labels = payload_sync + b * 8
    payload_bank = n * d * 4 + n * 8  # features + labels, sent by rank 0
    summary = {
        "world_size": world,
        "num_samples": n,
        "dim": d,
        "batch_per_rank": b,
        "sync_bytes_per_rank_measured": max(r["sync"][0] for r in res),
        "sync_bytes_per_rank_payload": payload_sync * (world - 1),
        "sync_labels_bytes_per_rank_measured": max(r["sync+labels"][0] for r in res),
        "sync_labels_bytes_per_rank_payload": payload_labels * (world - 1),
        "broadcast_bytes_rank0_measured": res[0]["broadcast"][0],
        "broadcast_bytes_rank0_payload": payload_bank,
        "sync_seconds": max(r["sync"][1] for r in res),
        "broadcast_seconds": max(r["broadcast"][1] for r in res),
    }
    summary["ratio_broadcast_over_sync"] = summary["broadcast_bytes_rank0_measured"] / max(
        1, summary["sync_bytes_per_rank_measured"]
    )
    summary["ratio_broadcast_over_sync_labels"] = summary["broadcast_bytes_rank0_measured"] / max(
        1, summary["sync_labels_bytes_per_rank_measured"]
    )
    if "method" in res[0]:
        summary["interclr_after_step_bytes_per_rank"] = max(r["method"]["bytes_per_step"] for r in res)
        summary["interclr_after_step_seconds"] = max(r["method"]["seconds_per_step"] for r in res)
        summary["interclr_state_identical_on_both_ranks"] = bool(res[0]["method"]["identical"])
    if args.json:
        print(json.dumps(summary))
        return

    def mb(x):
        return f"{x / 2**20:,.3f} MiB" if x >= 2**20 else f"{x:,} B"

    s = summary
    print(f"2 gloo ranks on the CPU, N = {n:,}, D = {d}, B = {b} per rank (global batch {b * world})")
    print(
        f"  bank sync (indices + keys, all-gather):     {mb(s['sync_bytes_per_rank_measured'])} per rank per step "
        f"(payload {mb(s['sync_bytes_per_rank_payload'])}), {s['sync_seconds'] * 1e3:.2f} ms"
    )
    print(
        f"  bank sync + labels:                          {mb(s['sync_labels_bytes_per_rank_measured'])} per rank per step "
        f"(payload {mb(s['sync_labels_bytes_per_rank_payload'])})"
    )
    print(
        f"  broadcast the whole bank (features+labels): {mb(s['broadcast_bytes_rank0_measured'])} from rank 0 per step "
        f"(payload {mb(s['broadcast_bytes_rank0_payload'])}), {s['broadcast_seconds']:.2f} s"
    )
    print(
        f"  ratio broadcast / sync: {s['ratio_broadcast_over_sync']:,.0f}x   (/ sync+labels: {s['ratio_broadcast_over_sync_labels']:,.0f}x)"
    )
    if "interclr_after_step_bytes_per_rank" in s:
        print(
            f"  real InterCLR after_optimizer_step (queue + bank + online labels, K = 10,000): "
            f"{mb(s['interclr_after_step_bytes_per_rank'])} per rank per step, {s['interclr_after_step_seconds'] * 1e3:.1f} ms; "
            f"bank/labels/centroids identical on both ranks: {s['interclr_state_identical_on_both_ranks']}"
        )


if __name__ == "__main__":
    sys.exit(main())
