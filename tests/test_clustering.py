"""k-means: faiss and pure-torch paths on well-separated blobs; assignment helper; PCA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from interclr_cli.eval import clustering
from interclr_cli.eval.clustering import (
    KMeans,
    assign,
    faiss_available,
    faiss_gpu_available,
    faiss_num_gpus,
    kmeans,
    pca_apply,
    pca_fit,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(centers=5, per=120, d=16, spread=0.03, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(centers, d, generator=g), dim=1)
    x = F.normalize(c.repeat_interleave(per, 0) + spread * torch.randn(centers * per, d, generator=g), dim=1)
    return x, torch.arange(centers).repeat_interleave(per)


def _pure(labels: torch.Tensor, truth: torch.Tensor) -> bool:
    """Every found cluster lies inside one true blob."""
    return all(truth[labels == c].unique().numel() == 1 for c in labels.unique())


BACKENDS = ["torch"] + (["faiss"] if faiss_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spherical", [False, True])
def test_kmeans_recovers_blobs(backend, spherical):
    x, truth = _blobs()
    # k = 8 x blobs: with random initial centroids every blob gets some of them (almost surely),
    # so a sensible k-means never mixes two blobs in one cluster
    km = kmeans(x, 40, iters=10, seed=0, use_gpu=False, spherical=spherical, backend=backend)
    assert isinstance(km, KMeans) and km.gpus == 0
    assert km.backend == ("faiss-cpu" if backend == "faiss" else "torch")
    cent, lab = km.centroids, km.labels
    assert cent.shape == (40, 16) and cent.dtype == torch.float32
    assert lab.shape == (600,) and lab.dtype == torch.long
    assert km.sqdist.shape == (600,) and km.sqdist.dtype == torch.float32
    assert _pure(lab, truth)
    want_lab, want_d = assign(x, cent)
    assert torch.equal(lab, want_lab)
    assert torch.allclose(km.sqdist, want_d, atol=1e-5)
    assert km.objective == pytest.approx(float(want_d.double().sum()), rel=1e-5)
    if spherical:
        assert torch.allclose(cent.norm(dim=1), torch.ones(40), atol=1e-4)
    # objective close to the true-blob partition's (which is near the optimum for k = blobs)
    _, d = assign(x, cent)
    truth_means = torch.stack([x[truth == c].mean(0) for c in range(5)])
    assert d.sum() <= assign(x, truth_means)[1].sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_k_equals_blobs_with_a_good_seed_and_is_deterministic(backend):
    x, truth = _blobs(centers=3, per=100)
    runs = [kmeans(x, 3, iters=15, seed=s, use_gpu=False, backend=backend).labels for s in (0, 0, 1, 2, 3)]
    assert torch.equal(runs[0], runs[1])  # same seed, same clustering
    # random initialisation can get stuck; at least one of four seeds finds the three blobs
    assert any(_pure(r, truth) and r.unique().numel() == 3 for r in runs)


def test_assign_chunks_match_brute_force():
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(1000, 8, generator=g), torch.randn(13, 8, generator=g)
    lab, dist = assign(x, c, chunk=97)
    d2 = torch.cdist(x.double(), c.double()) ** 2
    assert torch.equal(lab, d2.argmin(1))
    assert torch.allclose(dist.double(), d2.min(1).values, atol=1e-4)


def test_availability_flags_and_fallback(monkeypatch):
    assert isinstance(faiss_available(), bool) and isinstance(faiss_gpu_available(), bool)
    assert faiss_gpu_available() == (faiss_num_gpus() > 0)
    if not torch.cuda.is_available():
        assert not faiss_gpu_available()
    # without faiss importable, "auto" runs the torch path
    monkeypatch.setattr(clustering, "faiss_available", lambda: False)
    called = {}
    real = clustering._kmeans_torch

    def spy(*a, **k):
        called["torch"] = True
        return real(*a, **k)

    monkeypatch.setattr(clustering, "_kmeans_torch", spy)
    x, truth = _blobs(centers=2, per=50)
    km = kmeans(x, 8, iters=5)
    assert called and km.backend == "torch" and _pure(km.labels, truth)


def test_kmeans_rejects_bad_k():
    with pytest.raises(ValueError):
        kmeans(torch.randn(5, 3), 6)


def test_kmeans_uses_every_point(monkeypatch):
    """No faiss subsampling (faiss.Kmeans's default 256 points per centroid would take 512 of 3000)."""
    if not faiss_available():
        pytest.skip("faiss not installed")
    import faiss

    seen = {}
    real = faiss.Clustering.train

    def spy(self, x, index, *a):
        seen["max_points"], seen["n"] = self.max_points_per_centroid, len(x)
        return real(self, x, index, *a)

    monkeypatch.setattr(faiss.Clustering, "train", spy)
    x, _ = _blobs(centers=2, per=1500, d=4)
    km = kmeans(x, 2, iters=3, backend="faiss", use_gpu=False)
    assert seen["n"] == 3000 and seen["max_points"] * 2 >= 3000
    assert km.labels.shape == (3000,)


def test_kmeans_is_frozen():
    km = kmeans(torch.randn(20, 3), 2, iters=2, backend="torch")
    with pytest.raises(AttributeError):
        km.objective = 0.0  # type: ignore[misc]


def test_pca_fit_matches_svd_and_apply_normalises():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, 6, generator=g) @ torch.diag(torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1]))
    mean, comps = pca_fit(x, 3)
    assert mean.shape == (6,) and comps.shape == (3, 6) and comps.dtype == torch.float32
    assert torch.allclose(mean, x.mean(0), atol=1e-5)
    _, _, vh = torch.linalg.svd((x - x.mean(0)).double(), full_matrices=False)
    for got, want in zip(comps.double(), vh[:3]):  # same axes up to sign, largest variance first
        assert abs(float(got @ want)) == pytest.approx(1.0, abs=1e-6)
    assert (comps.gather(1, comps.abs().argmax(1, keepdim=True)) > 0).all()
    y = pca_apply(x, mean, comps)
    assert y.shape == (500, 3) and torch.allclose(y.norm(dim=1), torch.ones(500), atol=1e-5)


@pytest.mark.skipif(not faiss_available(), reason="needs faiss (faiss-cpu) to stand in for the GPU build")
def test_faiss_gpu_kmeans_uses_this_process_gpu_only(monkeypatch):
    """A GPU build of faiss faked around faiss-cpu: k-means builds one flat GPU index on the local
    device (never an index on every visible GPU) and gives the CPU result."""
    import sys
    import types

    import faiss as real

    made = []

    class GpuIndexFlatConfig:
        device, useFloat16 = -1, True

    def gpu_index(res, d, cfg):
        made.append((cfg.device, cfg.useFloat16))
        return real.IndexFlatL2(d)

    def all_gpus(*a, **k):
        raise AssertionError("an index on every GPU")

    fake = types.SimpleNamespace(
        Clustering=real.Clustering,
        IndexFlatL2=real.IndexFlatL2,
        vector_to_array=real.vector_to_array,
        StandardGpuResources=lambda: object(),
        GpuIndexFlatConfig=GpuIndexFlatConfig,
        GpuIndexFlatL2=gpu_index,
        index_cpu_to_all_gpus=all_gpus,
        get_num_gpus=lambda: 4,
    )
    monkeypatch.setitem(sys.modules, "faiss", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # LOCAL_RANK 3's GPU
    x, _ = _blobs()
    km = kmeans(x, 5, iters=5, seed=0, backend="faiss")
    assert made == [(3, False)] and km.backend == "faiss-gpu" and km.gpus == 1 and km.where == "faiss on 1 GPU"
    monkeypatch.setitem(sys.modules, "faiss", real)
    cpu = kmeans(x, 5, iters=5, seed=0, use_gpu=False, backend="faiss")
    assert torch.equal(km.labels, cpu.labels)
