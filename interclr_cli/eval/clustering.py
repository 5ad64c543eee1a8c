"""k-means and PCA for InterCLR's pseudo-labels and the ``cluster`` command.

One entry point, :func:`kmeans`, returning a :class:`KMeans` (centroids, labels, squared
distances, objective), with faiss (CPU, or this process's GPU) when importable and a pure-torch
Lloyd otherwise.

InterCLR (arXiv 2008.11702) initialises the online labels (and computes offline labels every
epoch) with k-means over the L2-normalised features of the whole training set, K = 10,000 for
ImageNet. The released code (mmselfsup 0.x ``utils/clustering.py``, after DeepCluster) runs
``faiss.Clustering`` with ``niter=20``, ``max_points_per_centroid=10,000,000`` (i.e. no
subsampling of the training set) on a GPU flat-L2 index, plain (not spherical) k-means on the
normalised features, and labels every point by its nearest centroid. :func:`kmeans` does the same
for both callers (``faiss.Kmeans``'s default of 256 points per centroid, which subsamples above
256 k points, is not used); ``spherical=True`` renormalises the centroids after every iteration.

Fallback: without faiss, :func:`kmeans` runs the same Lloyd iterations in torch on the features'
device (k distinct random points as initial centroids, chunked assignments, empty clusters
re-seeded at random points, like faiss's splitting in spirit but simpler). It is exact Lloyd, only
slower than faiss on CPU; tests check both paths find well-separated blobs.

:func:`pca_fit` / :func:`pca_apply`: the optional PCA of ``cluster --pca`` (DeepCluster
PCA-reduces and L2-normalises before k-means; it also whitens, this does not).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

_ASSIGN_CHUNK = 1 << 15
_PCA_CHUNK = 65536
#: faiss ``max_points_per_centroid`` (the reference's value): never subsample the points.
MAX_POINTS_PER_CENTROID = 10_000_000


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except Exception:  # ImportError, or a broken binary
        return False
    return True


def faiss_num_gpus() -> int:
    """How many GPUs faiss sees: 0 without faiss, without GPU support (faiss-cpu) or without GPUs."""
    if not faiss_available():
        return 0
    import faiss

    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0
    except Exception:
        return 0


def faiss_gpu_available() -> bool:
    """faiss was built with GPU support and sees a GPU."""
    return faiss_num_gpus() > 0


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
    x: torch.Tensor, k: int, iters: int, seed: int, spherical: bool, gpu: Optional[int], verbose: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """faiss.Clustering on every point; ``(centroids [k, D], labels [N], sqdist [N])`` as numpy,
    the labels from a search of the trained index (which holds the final centroids). ``gpu``: the
    CUDA device index of a flat GPU index (this process's GPU only), or None for the CPU."""
    import faiss

    xn = np.ascontiguousarray(x.detach().float().cpu().numpy())
    d = xn.shape[1]
    clus = faiss.Clustering(d, k)
    clus.niter = iters
    clus.seed = seed
    clus.spherical = spherical
    clus.verbose = verbose
    clus.max_points_per_centroid = MAX_POINTS_PER_CENTROID  # as the reference: use every point
    clus.min_points_per_centroid = 1  # tiny data sets are legitimate in tests and demos
    if gpu is None:
        index = faiss.IndexFlatL2(d)
    else:
        # this process's GPU alone: under torchrun every other GPU belongs to another rank (waiting
        # in a collective, maybe in EXCLUSIVE_PROCESS mode); float32 distances, as on the CPU
        res = faiss.StandardGpuResources()  # kept alive until the index is done
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = int(gpu)
        cfg.useFloat16 = False
        index = faiss.GpuIndexFlatL2(res, d, cfg)
    clus.train(xn, index)
    cent = faiss.vector_to_array(clus.centroids).reshape(k, d)
    sqdist, labels = index.search(xn, 1)
    return cent.copy(), labels[:, 0].astype(np.int64), np.maximum(sqdist[:, 0], 0).astype(np.float32)


def _local_gpu(features: torch.Tensor) -> int:
    """The CUDA device of this process: the features' GPU, else the current device (LOCAL_RANK's
    under a distributed launch)."""
    if features.is_cuda:
        return int(features.device.index or 0)
    return int(torch.cuda.current_device()) if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class KMeans:
    """Result of :func:`kmeans`, tensors on the features' device.

    ``centroids`` [k, D] float32; ``labels`` [N] int64, the nearest centroid (squared L2) of every
    point; ``sqdist`` [N] float32, its squared distance (2 - 2 cos for unit vectors and centroids);
    ``objective``, the k-means objective ``sum(sqdist)`` (float64) of this final assignment;
    ``backend``: ``faiss-cpu``, ``faiss-gpu`` or ``torch``; ``gpus``: how many GPUs faiss used.
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    sqdist: torch.Tensor
    objective: float
    backend: str
    gpus: int = 0

    @property
    def where(self) -> str:
        """Human-readable: ``faiss on 1 GPU``, ``faiss on the CPU``, ``torch on cuda:0``..."""
        if self.backend == "torch":
            return f"torch on {self.labels.device}"
        return f"faiss on {self.gpus} GPU{'s' if self.gpus > 1 else ''}" if self.gpus else "faiss on the CPU"


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
) -> KMeans:
    """k-means of ``features`` [N, D] into ``k`` clusters, on every point (no subsampling).

    Args:
        features: [N, D] tensor (any device/float dtype); cluster it as given (normalise first
            for InterCLR, as the reference does).
        k: number of clusters (1 <= k <= N).
        iters: Lloyd iterations (reference: 20).
        seed: initialisation seed (faiss ``Clustering.seed`` / torch generator); same seed, same
            data and backend: same result.
        use_gpu: use a faiss GPU index on this process's GPU (the features' device, else the
            current one) when faiss has GPU support and a GPU is present; never the other ranks'
            GPUs. The torch fallback runs on the features' device.
        verbose: faiss progress output / per-iteration log lines for the torch fallback.
        spherical: renormalise centroids each iteration (spherical k-means).
        backend: ``auto`` (faiss if importable, else torch), ``faiss`` or ``torch``.
        log: where verbose torch-fallback lines and the timing go (default ``print``).

    Returns: a :class:`KMeans`. Raises ``ValueError`` for k outside [1, N] or a bad backend.
    """
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= N, got k={k}, N={n}")
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be auto, faiss or torch, got {backend!r}")
    use_faiss = backend == "faiss" or (backend == "auto" and faiss_available())
    say = log or print
    t0 = time.perf_counter()
    gpus = 0
    if use_faiss:
        gpu = _local_gpu(features) if use_gpu and faiss_num_gpus() > 0 else None
        gpus = 0 if gpu is None else 1
        cent, lab, sq = _kmeans_faiss(features, k, iters, seed, spherical, gpu, verbose)
        centroids, labels, sqdist = (torch.from_numpy(a).to(features.device) for a in (cent, lab, sq))
        name = "faiss-gpu" if gpus else "faiss-cpu"
    else:
        centroids = _kmeans_torch(features, k, iters, seed, spherical, say if verbose else None)
        labels, sqdist = assign(features, centroids)
        name = "torch"
    result = KMeans(centroids, labels, sqdist, float(sqdist.double().sum()), name, gpus)
    if verbose:
        say(f"kmeans({name}) N={n} k={k} iters={iters}: {time.perf_counter() - t0:.1f} s")
    return result


@torch.no_grad()
def pca_fit(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean [D], components [dim, D])`` float32 of the rows of ``x`` [N, D], on x's device.

    The components are the top ``dim`` eigenvectors of the covariance (largest variance first),
    accumulated in float64 chunk by chunk (no centred copy of x), each sign fixed so that its
    largest-magnitude entry is positive (deterministic output).
    """
    n, d = x.shape
    mean = x.double().mean(0)
    cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for s in range(0, n, _PCA_CHUNK):
        c = x[s : s + _PCA_CHUNK].double() - mean
        cov += c.T @ c
    cov /= max(n - 1, 1)
    _, vecs = torch.linalg.eigh(cov)
    comps = vecs[:, -dim:].flip(1).T  # [dim, D], largest variance first
    idx = comps.abs().argmax(dim=1, keepdim=True)
    comps = comps * torch.sign(comps.gather(1, idx))
    return mean.float(), comps.float().contiguous()


@torch.no_grad()
def pca_apply(x: torch.Tensor, mean: torch.Tensor, comps: torch.Tensor) -> torch.Tensor:
    """``normalize((x - mean) @ comps.T)``: [N, D] -> unit rows [N, dim]."""
    return F.normalize((x - mean) @ comps.T, dim=1)


__all__ = [
    "KMeans",
    "assign",
    "faiss_available",
    "faiss_gpu_available",
    "faiss_num_gpus",
    "kmeans",
    "pca_apply",
    "pca_fit",
]
