"""`interclr cluster`: k-means of the frozen features, scored against labels when they exist.

Features (backbone, or the projection head's embedding) are L2-normalised, optionally projected
onto their top ``--pca`` principal components (then normalised again), and clustered with
:func:`~interclr_cli.eval.clustering.kmeans` on every point (faiss, on the GPUs when the command
runs on CUDA and faiss-gpu is installed; a torch Lloyd without faiss). Outputs in the run folder:

- ``assignments.csv``: ``path,cluster,distance`` per image, distance being the squared Euclidean
  distance to the centroid in the clustered space (normalised features: 2 - 2 cos);
- ``centroids.safetensors``: ``centroids`` [k, d] and, with PCA, ``pca.mean`` [D] and
  ``pca.components`` [d, D] (project with ``normalize((normalize(x) - mean) @ components.T)``);
- ``clusters.png``: one row per largest cluster, the images nearest its centroid;
- with labels: NMI, ARI, AMI, purity and Hungarian-matched accuracy
  (:func:`~interclr_cli.eval.metrics.cluster_report`).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data import load_rgb
from ..data.sources import FileIndex
from ..errors import UserError
from ..eval.clustering import kmeans, pca_apply, pca_fit
from ..eval.metrics import cluster_report
from ..runtime import dist
from ..runtime.device import process_device
from ..runtime.progress import Reporter
from ..training.checkpoint import atomic_save
from ..training.features import extract_with_config
from ..training.rundir import MetricsLog, file_log
from .common import close_run, open_run, prepare_backbone, refuse_early, resolve_config, single_folder, with_head
from .contact_sheet import contact_sheet
from .loading import CheckpointInfo, load_backbone

log = logging.getLogger("interclr")


def nearest_per_cluster(assign: np.ndarray, dist: np.ndarray, clusters: np.ndarray, n: int) -> list[np.ndarray]:
    """For each id in ``clusters``, the positions of its ``n`` members nearest the centroid."""
    order = np.lexsort((dist, assign))  # by cluster, then by distance
    sorted_assign = assign[order]
    starts = np.searchsorted(sorted_assign, clusters, side="left")
    ends = np.searchsorted(sorted_assign, clusters, side="right")
    return [order[s : min(e, s + n)] for s, e in zip(starts, ends)]


def write_contact_sheet(
    path: Path, index: FileIndex, assign: np.ndarray, dist: np.ndarray, k: int, rows: int, per_row: int, thumb: int = 64
) -> list[dict]:
    """``clusters.png``: the ``per_row`` images nearest each of the ``rows`` largest clusters' centroids."""
    sizes = np.bincount(assign, minlength=k)
    top = np.argsort(-sizes, kind="stable")[:rows]
    top = top[sizes[top] > 0]
    members = nearest_per_cluster(assign, dist, top, per_row)
    labels = np.asarray(index.labels)
    grid, names, described = [], [], []
    for cid, pos in zip(top.tolist(), members):
        images = []
        for p in pos.tolist():
            img = load_rgb(index.paths[p])
            images.append(img if img is not None else Image.new("RGB", (thumb, thumb), (128, 128, 128)))
        grid.append(images)
        row = {"cluster": cid, "size": int(sizes[cid])}
        name = f"#{cid} n={int(sizes[cid])}"
        if index.has_labels:
            cls = int(np.bincount(labels[assign == cid]).argmax())
            row["majority_class"] = index.classes[cls] if cls < len(index.classes) else str(cls)
            name += f": {row['majority_class'][:12]}"
        names.append(name)
        described.append(row)
    if grid:
        contact_sheet(grid, path, thumb=thumb, labels=names)
    return described


def _finite(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def run_cluster(
    checkpoint: str,
    preset: Optional[str],
    overrides: list[str],
    *,
    out: Optional[str],
    force: bool,
    k: Optional[int] = None,
    features: str = "backbone",
    pca: int = 0,
    iters: int = 20,
    sheet_clusters: int = 10,
    sheet_images: int = 8,
    show_progress: bool = True,
) -> dict:
    if features not in ("backbone", "embedding"):
        raise UserError(f"--features must be backbone or embedding; got {features!r}")
    if iters < 1 or sheet_clusters < 0 or sheet_images < 1:
        raise UserError("--iters and --sheet-images must be positive and --sheet-clusters >= 0")
    refuse_early("cluster", out, force)
    backbone, head, info = load_backbone(checkpoint)
    cfg = resolve_config("cluster", preset, overrides, info)
    index = single_folder(cfg)
    n = len(index)
    if k is None:
        if not index.has_labels:
            raise UserError(f"{index.root} has no labels to guess the number of clusters from; pass --k N")
        k = len(index.classes)
    if not 1 <= k <= n:
        raise UserError(
            f"--k {k} must be between 1 and the number of images ({n}); choose a smaller --k or more images"
        )
    device = process_device(cfg.device)
    backbone = prepare_backbone(backbone, cfg, device)
    fn = backbone
    if features == "embedding":
        fn = with_head(backbone, head.to(device) if head is not None else None, info, "--features embedding").eval()
    dim_in = info.feature_dim if features == "backbone" else int(info.embed_dim or 0)
    if pca < 0 or (pca and pca >= dim_in):
        raise UserError(f"--pca {pca} must be 0 (off) or below the feature dimension {dim_in}")
    run_dir = open_run(
        "cluster",
        cfg,
        out,
        force,
        {"source": info.source, "arch": info.description, "k": k, "features": features, "pca": pca, "iters": iters},
    )
    with file_log(run_dir / "train.log"):
        with Reporter(enabled=show_progress) as reporter:
            (x,), _ = extract_with_config(fn, index, cfg, device, reporter, f"{features} features")
            if not dist.is_main():  # rank 0 clusters alone: free this rank's copy while it waits
                x = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            result = dist.main_only(
                lambda: _cluster_and_write(
                    x,
                    index,
                    k,
                    cfg.seed,
                    device,
                    run_dir,
                    reporter,
                    info,
                    features=features,
                    pca=pca,
                    iters=iters,
                    sheet_clusters=sheet_clusters,
                    sheet_images=sheet_images,
                )
            )
    close_run(run_dir, result)
    return result


def _write_clustering(
    run_dir: Path,
    index: FileIndex,
    assign,
    sqdist,
    centroids,
    tensors: dict,
    k: int,
    features: str,
    pca: int,
    info: CheckpointInfo,
) -> tuple[Path, Path]:
    """``assignments.csv`` (path, cluster, squared distance) and ``centroids.safetensors``."""
    assignments = run_dir / "assignments.csv"
    with open(assignments, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "cluster", "distance"])
        w.writerows(zip(index.paths, assign.tolist(), np.round(sqdist.astype(np.float64), 6).tolist()))
    tensors["centroids"] = centroids
    centroid_path = run_dir / "centroids.safetensors"
    atomic_save(
        tensors,
        centroid_path,
        {
            "format": "interclr-centroids",
            "k": str(k),
            "features": features,
            "pca": str(pca),
            "normalized": "true",
            "source": info.source,
            "arch": info.arch,
            "small_stem": str(info.small_stem).lower(),
        },
    )
    return assignments, centroid_path


def _scores(labels: np.ndarray, assign: np.ndarray) -> dict:
    """The cluster metrics against the labels, under the result's key names."""
    rep = cluster_report(labels, assign)
    return {
        "nmi": rep["nmi"],
        "ari": rep["ari"],
        "ami": _finite(rep["ami"]),
        "purity": rep["purity"],
        "accuracy": rep["hungarian_accuracy"],
        "num_classes": rep["num_classes"],
    }


def _cluster_and_write(
    x: torch.Tensor,
    index: FileIndex,
    k: int,
    seed: int,
    device: torch.device,
    run_dir: Path,
    reporter,
    info: CheckpointInfo,
    *,
    features: str,
    pca: int,
    iters: int,
    sheet_clusters: int,
    sheet_images: int,
) -> dict:
    """Normalise, PCA, k-means and every output file of ``cluster`` (rank 0's part); the result dict."""
    n = len(index)
    x = F.normalize(x, dim=1)
    tensors: dict[str, torch.Tensor] = {}
    if pca:
        mean, comps = pca_fit(x, pca)
        x = pca_apply(x, mean, comps)
        tensors.update({"pca.mean": mean, "pca.components": comps})
    task = reporter.task(f"k-means k={k}", total=None)
    t0 = time.perf_counter()
    km = kmeans(x, k, iters=iters, seed=seed, use_gpu=device.type == "cuda")
    centroids, assign, sqdist, obj = km.centroids.cpu(), km.labels.cpu().numpy(), km.sqdist.cpu().numpy(), km.objective
    reporter.finish(task)
    reporter.print(f"k-means: k={k} on {n} x {x.shape[1]} features in {time.perf_counter() - t0:.1f}s ({km.where})")
    assignments, centroid_path = _write_clustering(
        run_dir, index, assign, sqdist, centroids, tensors, k, features, pca, info
    )
    sheet = run_dir / "clusters.png"
    rows = write_contact_sheet(sheet, index, assign, sqdist, k, sheet_clusters, sheet_images) if sheet_clusters else []
    sizes = np.bincount(assign, minlength=k)
    result: dict = {
        "k": k,
        "assignments": str(assignments),
        "centroids": str(centroid_path),
        "sheet": str(sheet) if rows else None,
        "num_images": n,
        "features": features,
        "pca": pca,
        "objective": _finite(obj),
        "empty_clusters": int((sizes == 0).sum()),
        "largest_cluster": int(sizes.max()),
    }
    if index.has_labels:
        result.update(_scores(np.asarray(index.labels), assign))
    result.update({"sheet_rows": rows, "source": info.source, "arch": info.description, "run_dir": str(run_dir)})
    MetricsLog(run_dir / "metrics.jsonl").write(
        {
            "type": "cluster",
            **{
                key: result[key]
                for key in ("k", "nmi", "ari", "ami", "purity", "accuracy", "objective")
                if key in result
            },
        }
    )
    return result
