"""`interclr knn`: weighted kNN classification of val features against train features.

Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018:
cosine similarity, the k nearest training images vote with weight exp(sim / T). The library
(:func:`~interclr_cli.eval.knn.knn_top1`) works on chunks of val rows, so the full similarity
matrix is never held; the chunk is sized here so that a chunk's block stays near 256 MB.

Distributed (torchrun/srun): both feature sets are extracted sharded across the processes and
gathered (:func:`~interclr_cli.training.features.extract`), then each process classifies its own
contiguous share of the val rows (the extraction's shards) against the whole train set and the
predictions are gathered in val order: the result is that of one process.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ..data.loader import eval_shard
from ..eval.knn import knn_classify, knn_top1
from ..runtime import dist
from ..runtime.device import process_device
from ..runtime.progress import Reporter
from ..training.features import extract_with_config
from ..training.rundir import MetricsLog, file_log
from .common import close_run, labelled_splits, open_run, prepare_backbone, refuse_early, resolve_config
from .loading import load_backbone

log = logging.getLogger("interclr")

BLOCK_BYTES = 256 << 20


def knn_chunk(num_train: int) -> int:
    """Val rows per chunk so that a [chunk, num_train] float32 block is at most ~256 MB (1..1024)."""
    return max(1, min(1024, BLOCK_BYTES // (4 * max(num_train, 1))))


def sharded_knn_top1(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    ks: list[int],
    **kw,
) -> dict[int, float]:
    """:func:`~interclr_cli.eval.knn.knn_top1` with the val rows split across the ranks (each rank
    holds both full feature sets); every rank returns the same accuracies."""
    if dist.world_size() == 1:
        return knn_top1(train_feats, train_labels, val_feats, val_labels, ks, **kw)
    n = val_feats.shape[0]
    if n == 0 or val_labels.shape[0] != n:  # the library's own one-line errors, on every rank
        return knn_top1(train_feats, train_labels, val_feats, val_labels, ks, **kw)
    shard = eval_shard(n, dist.rank(), dist.world_size())
    mine = knn_classify(train_feats, train_labels, val_feats[shard.start : shard.stop], ks, **kw)
    target = val_labels.cpu().long()
    return {k: 100.0 * float((dist.all_gather_rows(p) == target).float().mean()) for k, p in mine.items()}


def run_knn(
    checkpoint: str,
    preset: Optional[str],
    overrides: list[str],
    *,
    out: Optional[str],
    force: bool,
    show_progress: bool = True,
) -> dict:
    """Weighted kNN top-1 of ``checkpoint``'s backbone features (val against train) for every k of
    ``eval.knn_k``; the JSON-ready result: ``top1`` (keyed by k as a string), ``k``, ``run_dir`` ..."""
    refuse_early("knn", out, force)
    backbone, _, info = load_backbone(checkpoint)
    cfg = resolve_config("knn", preset, overrides, info)
    train, val = labelled_splits(cfg)
    ks = sorted(set(cfg.eval.knn_k))
    device = process_device(cfg.device)
    backbone = prepare_backbone(backbone, cfg, device)
    run_dir = open_run("knn", cfg, out, force, {"source": info.source, "arch": info.description})
    with file_log(run_dir / "train.log"):
        with Reporter(enabled=show_progress) as reporter:
            (tf,), tl = extract_with_config(backbone, train, cfg, device, reporter, "train features")
            (vf,), vl = extract_with_config(backbone, val, cfg, device, reporter, "val features")
        top1 = sharded_knn_top1(
            tf,
            tl.to(device),
            vf,
            vl,
            ks,
            temperature=cfg.eval.knn_temperature,
            num_classes=len(train.classes),
            chunk_size=knn_chunk(len(train)),
        )
    result = {
        "top1": {str(k): round(v, 4) for k, v in top1.items()},  # float32 accumulation noise removed
        "k": ks,
        "temperature": cfg.eval.knn_temperature,
        "num_train": len(train),
        "num_val": len(val),
        "num_classes": len(train.classes),
        "source": info.source,
        "arch": info.description,
        "run_dir": str(run_dir),
    }
    MetricsLog(run_dir / "metrics.jsonl").write({"type": "knn", **{f"top1_k{k}": v for k, v in top1.items()}})
    close_run(run_dir, result)
    return result
