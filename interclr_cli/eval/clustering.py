"""k-means for InterCLR's pseudo-labels: faiss when importable, a pure-torch Lloyd otherwise.

InterCLR (arXiv 2008.11702) initialises the online labels (and computes offline labels every
epoch) with k-means over the L2-normalised features of the whole training set, K = 10,000 for
ImageNet. The released code (mmselfsup 0.x ``utils/clustering.py``, after DeepCluster) runs
``faiss.Clustering`` with ``niter=20``, ``max_points_per_centroid=10,000,000`` (i.e. no
subsampling of the training set) on a GPU flat-L2 index, plain (not spherical) k-means on the
normalised features, and labels every point by its nearest centroid. :func:`kmeans` does the same
by default; ``spherical=True`` renormalises the centroids after every iteration instead.

Fallback: without faiss, :func:`kmeans` runs the same Lloyd iterations in torch on the features'
device (k distinct random points as initial centroids, chunked assignments, empty clusters
re-seeded at random points, like faiss's splitting in spirit but simpler). It is exact Lloyd, only
slower than faiss on CPU; tests check both paths find well-separated blobs.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

_ASSIGN_CHUNK = 1 << 15


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except Exception:  # ImportError, or a broken binary
        return False
    return True


def faiss_gpu_available() -> bool:
    """faiss was built with GPU support and sees a GPU."""
    if not faiss_available():
        return False
    import faiss

    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:
        return False


@torch.no_grad()
def assign(
    features: torch.Tensor, centroids: torch.Tensor, chunk: int = _ASSIGN_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (squared L2) of every row, in chunks of ``chunk`` rows.

    Returns ``(labels [N] int64, squared distances [N] float32)`` on the features' device.
    """
    c = centroids.to(features.device, torch.float32)
    c_sq = (c * c).sum(1)  # [K]
    n = features.shape[0]
    labels = torch.empty(n, dtype=torch.long, device=features.device)
    dist = torch.empty(n, dtype=torch.float32, device=features.device)
    for s in range(0, n, chunk):
        x = features[s : s + chunk].float()
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2
        d = torch.addmm(c_sq.unsqueeze(0), x, c.t(), alpha=-2.0)  # [n_chunk, K] minus ||x||^2
        best, lab = d.min(dim=1)
        labels[s : s + chunk] = lab
        dist[s : s + chunk] = (best + (x * x).sum(1)).clamp_min(0)
    return labels, dist


def _kmeans_torch(
    x: torch.Tensor, k: int, iters: int, seed: int, spherical: bool, log: Optional[Callable[[str], None]]
) -> torch.Tensor:
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:k].to(x.device)].float().clone()
    for it in range(iters):
        labels, dist = assign(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x.float())
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        empty = counts.squeeze(1) == 0
        n_empty = int(empty.sum())
        if n_empty:  # re-seed empty clusters at random points (few; deterministic given seed)
            pick = torch.randint(0, n, (n_empty,), generator=g).to(x.device)
            centroids[empty] = x[pick].float()
        if spherical:
            centroids = torch.nn.functional.normalize(centroids, dim=1)
        if log is not None:
            log(f"kmeans(torch) iter {it + 1}/{iters}: objective {dist.sum().item():.4g}, empty {n_empty}")
    return centroids


def _kmeans_faiss(
    x: torch.Tensor, k: int, iters: int, seed: int, spherical: bool, gpu: bool, verbose: bool
) -> torch.Tensor:
    import faiss
    import numpy as np

    xn = np.ascontiguousarray(x.detach().float().cpu().numpy())
    d = xn.shape[1]
    clus = faiss.Clustering(d, k)
    clus.niter = iters
    clus.seed = seed
    clus.spherical = spherical
    clus.verbose = verbose
    clus.max_points_per_centroid = 10_000_000  # as the reference: use every point
    clus.min_points_per_centroid = 1  # tiny data sets are legitimate in tests and demos
    index = faiss.IndexFlatL2(d)
    if gpu:
        # every visible GPU: the k centroids replicated on each, each assignment pass's points
        # split between them (IndexReplicas); float32 distances, as on the CPU
        co = faiss.GpuMultipleClonerOptions()
        co.useFloat16 = False
        co.shard = False
        index = faiss.index_cpu_to_all_gpus(index, co)
    clus.train(xn, index)
    cent = faiss.vector_to_array(clus.centroids).reshape(k, d)
    return torch.from_numpy(cent.copy())


@torch.no_grad()
def kmeans(
    features: torch.Tensor,
    k: int,
    iters: int = 20,
    seed: int = 0,
    use_gpu: bool = True,
    verbose: bool = False,
    spherical: bool = False,
    backend: str = "auto",
    log: Optional[Callable[[str], None]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of ``features`` [N, D] into ``k`` clusters.

    Args:
        features: [N, D] tensor (any device/float dtype); cluster it as given (normalise first
            for InterCLR, as the reference does).
        k: number of clusters (1 <= k <= N).
        iters: Lloyd iterations (reference: 20).
        seed: initialisation seed (faiss ``Clustering.seed`` / torch generator).
        use_gpu: use faiss GPU indexes, on every visible GPU, when faiss has GPU support and a
            GPU is present (in a distributed run k-means runs on rank 0 alone, which then uses
            the other ranks' GPUs too).
        verbose: faiss progress output / per-iteration log lines for the torch fallback.
        spherical: renormalise centroids each iteration (spherical k-means).
        backend: ``auto`` (faiss if importable, else torch), ``faiss`` or ``torch``.
        log: where verbose torch-fallback lines and the timing go (default ``print``).

    Returns: ``(centroids [k, D] float32, labels [N] int64)`` on the features' device; labels
    are the nearest centroid (squared L2) of every point.
    """
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= N, got k={k}, N={n}")
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be auto, faiss or torch, got {backend!r}")
    use_faiss = backend == "faiss" or (backend == "auto" and faiss_available())
    say = log or print
    t0 = time.perf_counter()
    if use_faiss:
        gpu = bool(use_gpu and faiss_gpu_available())
        centroids = _kmeans_faiss(features, k, iters, seed, spherical, gpu, verbose).to(features.device)
        name = "faiss-gpu" if gpu else "faiss-cpu"
    else:
        centroids = _kmeans_torch(features, k, iters, seed, spherical, say if verbose else None)
        name = "torch"
    labels, _ = assign(features, centroids)
    if verbose:
        say(f"kmeans({name}) N={n} k={k} iters={iters}: {time.perf_counter() - t0:.1f} s")
    return centroids, labels


__all__ = ["assign", "faiss_available", "faiss_gpu_available", "kmeans"]
