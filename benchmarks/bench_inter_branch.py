"""Cost of InterCLR's inter-image branch alone, at ImageNet scale, on the CPU.

One inter-branch step = what InterCLR adds to a MoCo v2 step for a batch of B queries:

1. ``sim``      similarities of the detached queries to the whole bank      [B, N]
2. ``pos``      positive sampling from the queries' clusters (labels sorted once)
3. ``neg``      semi-hard negative sampling (exact or sampled pool threshold)
4. ``loss``     MarginNCE forward + backward to the queries
5. ``bank``     bank update with the keys
6. ``labels``   online label step (relabel the batch; small-cluster check); every
                ``centroid_update_every``-th step also recomputes all centroids (reported apart)

Defaults are the released setting: N = 1,281,167, D = 128, K = 10,000, P = 128,000, M = 16,384,
batch 32 (one GPU's share in the reference 8 x 32). Bank and labels are random (no k-means pass:
the cost does not depend on the values). Repetitions interleave the exact and sampled variants
and the median of each is reported (these machines are noisy).

    python benchmarks/bench_inter_branch.py
    python benchmarks/bench_inter_branch.py --num-samples 100000 --pool 10000 --repeats 3
    python benchmarks/bench_inter_branch.py --gather     # + the reference's [B, M, D] feature gather
    python benchmarks/bench_inter_branch.py --resnet     # + a ResNet-50 224 px batch-32 train step
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from interclr_cli.losses import margin_nce
from interclr_cli.memory import LabelIndex, MemoryBank, OnlineLabels, sample_negatives, sample_positives


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-samples", type=int, default=1_281_167)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=10_000)
    ap.add_argument("--pool", type=int, default=128_000)
    ap.add_argument("--negatives", type=int, default=16_384)
    ap.add_argument("--pool-sample", type=int, default=16_384)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--mode", default="semihard")
    ap.add_argument("--bank-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--gather", action="store_true", help="also time the reference-style feature gather")
    ap.add_argument("--resnet", action="store_true", help="also time a ResNet-50 224 px train step")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    n, d, k, b = args.num_samples, args.dim, args.clusters, args.batch
    torch.manual_seed(0)
    t0 = time.perf_counter()
    bank = MemoryBank(n, d, dtype=getattr(torch, args.bank_dtype))
    for s in range(0, n, 1 << 18):  # random unit rows, filled in chunks
        bank.features[s : s + (1 << 18)] = F.normalize(torch.randn(min(1 << 18, n - s), d), dim=1).to(bank.dtype)
    labels = OnlineLabels(n, k, d, min_cluster_size=20, centroid_update_every=10)
    labels.init(torch.randint(0, k, (n,)), bank.features)
    setup_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    sim_buf = torch.empty(b, n)
    workspace: dict = {}  # reused sampling temporaries, as the method keeps them

    def step(threshold: str, centroid_step: bool = False) -> dict[str, float]:
        times: dict[str, float] = {}
        last = time.perf_counter()

        def mark(name: str) -> None:
            nonlocal last
            now = time.perf_counter()
            times[name] = now - last
            last = now

        idx = torch.randint(0, n, (b,), generator=gen)
        q = F.normalize(torch.randn(b, d, generator=gen), dim=1).requires_grad_()
        k_ = F.normalize(torch.randn(b, d, generator=gen), dim=1)
        last = time.perf_counter()
        sim = bank.similarity(q.detach(), out=sim_buf)
        mark("sim")
        ql = labels.labels[idx]
        pos = sample_positives(labels.labels, ql, gen, LabelIndex.build(labels.labels))
        mark("pos")
        neg = sample_negatives(
            sim, labels.labels, ql, args.mode, args.negatives, args.pool, gen, threshold, args.pool_sample, workspace
        )
        mark("neg")
        pos_cos = (q * bank.rows(pos)).sum(1)
        loss = margin_nce(pos_cos, bank.cosine(q, neg.indices, sim), 0.2, -0.5, "additive", neg.valid)
        loss.backward()
        mark("loss")
        bank.update(idx, k_, 1.0)
        mark("bank")
        it = 9 if centroid_step else 0  # (it + 1) % 10 == 0 -> centroid recomputation
        labels.step(it, idx, bank.rows(idx), bank.features, gen)
        mark("labels")
        times["total"] = sum(times.values())
        return times

    results: dict[str, list[dict[str, float]]] = {"exact": [], "sampled": [], "centroids": []}
    step("exact")
    step("sampled")  # warm-up
    for _ in range(args.repeats):
        for th in ("exact", "sampled"):
            results[th].append(step(th))
    for _ in range(max(1, args.repeats // 2)):
        results["centroids"].append(step("sampled", centroid_step=True))

    def med(rows, key):
        return statistics.median(r[key] for r in rows) * 1000

    keys = ["sim", "pos", "neg", "loss", "bank", "labels", "total"]
    report = {
        "setting": {
            a: getattr(args, a)
            for a in ("num_samples", "dim", "clusters", "pool", "negatives", "batch", "mode", "bank_dtype")
        },
        "threads": torch.get_num_threads(),
        "setup_s": round(setup_s, 1),
        "median_ms": {th: {key: round(med(results[th], key), 1) for key in keys} for th in results},
    }
    label_extra = med(results["centroids"], "labels") - med(results["sampled"], "labels")
    report["centroid_recompute_ms"] = round(label_extra, 1)
    for th in ("exact", "sampled"):
        report["median_ms"][th]["amortised_total"] = round(med(results[th], "total") + label_extra / 10, 1)

    if args.gather:  # the reference builds [B, M, D] negative features and a bmm
        idx = torch.randint(0, n, (b, args.negatives), generator=gen)
        q = F.normalize(torch.randn(b, d), dim=1).requires_grad_()
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            feats = bank.features[idx].float()
            torch.bmm(feats, q.unsqueeze(2)).squeeze(2).sum().backward()
            ts.append(time.perf_counter() - t)
        report["reference_gather_bmm_ms"] = round(statistics.median(ts) * 1000, 1)

    if args.resnet:
        import torchvision

        net = torchvision.models.resnet50()
        x = torch.randn(32, 3, 224, 224)
        ts = []
        for _ in range(2):
            t = time.perf_counter()
            net.zero_grad(set_to_none=True)
            net(x).sum().backward()
            ts.append(time.perf_counter() - t)
        report["resnet50_fwd_bwd_b32_224_ms"] = round(min(ts) * 1000, 1)

    if args.json:
        print(json.dumps(report, indent=2))
        return
    s = report["setting"]
    print(
        f"inter-branch step: N={s['num_samples']:,} D={s['dim']} K={s['clusters']:,} P={s['pool']:,} "
        f"M={s['negatives']:,} B={s['batch']} mode={s['mode']} bank={s['bank_dtype']} "
        f"threads={report['threads']} (setup {report['setup_s']} s)"
    )
    print(f"{'median ms':>12}" + "".join(f"{key:>9}" for key in keys) + f"{'amortised':>11}")
    for th in ("exact", "sampled"):
        row = report["median_ms"][th]
        print(f"{th:>12}" + "".join(f"{row[key]:9.1f}" for key in keys) + f"{row['amortised_total']:11.1f}")
    print(f"centroid recomputation (every 10th step): +{report['centroid_recompute_ms']:.1f} ms")
    if "reference_gather_bmm_ms" in report:
        print(f"reference-style [B, M, D] gather + bmm fwd/bwd: {report['reference_gather_bmm_ms']:.1f} ms")
    if "resnet50_fwd_bwd_b32_224_ms" in report:
        r = report["resnet50_fwd_bwd_b32_224_ms"]
        print(
            f"ResNet-50 fwd+bwd, batch 32, 224 px: {r:.0f} ms -> sampled overhead "
            f"{100 * report['median_ms']['sampled']['amortised_total'] / r:.1f}% of it"
        )


if __name__ == "__main__":
    main()
