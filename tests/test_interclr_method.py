"""InterCLR method: a few steps on a tiny ResNet-18 (small stem, 16 px), state round trips."""

from __future__ import annotations

import copy

import pytest
import torch

from interclr_cli.config import load_config
from interclr_cli.methods import TrainContext, build_method
from interclr_cli.methods import interclr as interclr_mod
from interclr_cli.methods.interclr import effective_num_clusters, effective_pool_size

pytestmark = pytest.mark.usefixtures("one_thread")

N = 48
TINY = [
    "model.arch=resnet18",
    "model.small_stem=true",
    "model.head_hidden=32",
    "model.embed_dim=16",
    "method.queue_size=32",
    "method.inter.num_clusters=4",
    "method.inter.min_cluster_size=4",
    "method.inter.num_negatives=12",
    "method.inter.pool_fraction=0.5",
    "method.inter.centroid_update_every=2",
    "method.inter.kmeans_iters=5",
    "method.intra.npid_negatives=20",
]


def _images(n=N, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _ctx(images, resumed=False):
    def extract(fn):
        with torch.no_grad():
            return torch.cat([fn(images[s : s + 16]) for s in range(0, images.shape[0], 16)])

    return TrainContext(
        device=torch.device("cpu"),
        num_samples=images.shape[0],
        steps_per_epoch=6,
        resumed=resumed,
        extract=extract,
        log=lambda s: None,
    )


# Logic-only tests use the ImageNet stem (16 px -> 4 px after the stem: ~16x cheaper); the tests
# the brief names (steps, normalised bank, extra_state round trip) use the small stem.
LIGHT = ["model.small_stem=false"]


def _method(*extra, start=True):
    torch.manual_seed(0)
    m = build_method(load_config("r18-cifar", TINY + list(extra)), N)
    if start:
        m.train()
        m.on_train_start(_ctx(_images()))
    return m


def _batch(step, b=8):
    g = torch.Generator().manual_seed(100 + step)
    return {
        "view1": torch.randn(b, 3, 16, 16, generator=g),
        "view2": torch.randn(b, 3, 16, 16, generator=g),
        "index": torch.randint(0, N, (b,), generator=g),
        "label": torch.full((b,), -1),
    }


def _run(m, steps, start=0, epoch=0):
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.05, momentum=0.9)
    out = []
    for s in range(start, start + steps):
        loss, logs = m.training_step(_batch(s), s, epoch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_optimizer_step(s)
        out.append((loss.detach(), logs))
    return out


def _check_state(m):
    f = m.bank.features
    assert torch.allclose(f.norm(dim=1), torch.ones(N), atol=1e-5)
    lab = m.labels
    assert torch.equal(lab.counts, torch.bincount(lab.labels, minlength=lab.num_clusters))


def test_steps_run_with_finite_losses_and_normalised_bank():
    m = _method()
    assert m.num_clusters == 4 and m.pool_size == 24
    _check_state(m)
    assert int(m.labels_epoch) == 0
    bank0 = m.bank.features.clone()
    hist = _run(m, 3)
    for loss, logs in hist:
        assert torch.isfinite(loss)
        assert {"loss_intra", "loss_inter"} <= set(logs)
        assert all(v.dim() == 0 for v in logs.values())
    assert {"label_change", "empty_clusters", "min_cluster_size", "max_cluster_size"} <= set(hist[-1][1])
    _check_state(m)
    assert not torch.equal(bank0, m.bank.features)  # rows of the batches were replaced
    assert (m.labels.counts >= 4).all()
    # bank, labels, centroids and counts are buffers: saved with the state_dict
    sd = m.state_dict()
    assert {"bank.features", "labels.labels", "labels.centroids", "labels.counts", "labels_epoch"} <= set(sd)


def test_bank_momentum_one_stores_the_normalised_keys():
    m = _method(*LIGHT)
    batch = _batch(0)
    loss, _ = m.training_step(batch, 0, 0)
    loss.backward()
    idx, keys = m._pending_bank
    keys = torch.nn.functional.normalize(keys.detach().float(), dim=1)
    m.after_optimizer_step(0)
    last = {int(i): j for j, i in enumerate(idx.tolist())}  # last occurrence wins
    for i, j in last.items():
        assert torch.allclose(m.bank.features[i], keys[j], atol=1e-6)


def test_extra_state_round_trip_reproduces_the_next_negatives(monkeypatch):
    m = _method()
    _run(m, 1)
    state, extra = copy.deepcopy(m.state_dict()), m.extra_state()
    assert set(extra) == {"label_generator", "shuffle_generator"}  # sampling seeds come from the step

    drawn = []
    real = interclr_mod.sample_negatives

    def spy(*a, **k):
        out = real(*a, **k)
        drawn.append(out.indices.clone())
        return out

    monkeypatch.setattr(interclr_mod, "sample_negatives", spy)
    m.training_step(_batch(2), 2, 0)
    # a fresh method resumed from the state: the same negatives for the same next step
    m2 = _method(start=False)
    m2.load_state_dict(state)
    m2.load_extra_state(extra)
    m2.train()
    m2.on_train_start(_ctx(_images(seed=9), resumed=True))  # resumed: no re-initialisation
    assert torch.equal(m2.bank.features, m.bank.features)
    m2.training_step(_batch(2), 2, 0)
    assert len(drawn) == 2 and torch.equal(drawn[0], drawn[1])
    # the same batch at another step draws other negatives
    m3 = _method(start=False)
    m3.load_state_dict(state)
    m3.training_step(_batch(2), 3, 0)
    assert not torch.equal(drawn[0], drawn[2])


def test_warmup_epochs_train_intra_only():
    m = _method(*LIGHT, "method.inter.warmup_epochs=1")
    ((loss, logs),) = _run(m, 1, epoch=0)
    assert "loss_inter" not in logs and torch.allclose(loss, logs["loss_intra"])
    ((loss, logs),) = _run(m, 1, start=1, epoch=1)
    assert "loss_inter" in logs
    assert torch.allclose(loss, 0.75 * logs["loss_intra"] + 0.25 * logs["loss_inter"], atol=1e-5)


def test_other_sampling_modes_and_angular_margin():
    m = _method(
        *LIGHT, "method.inter.margin_type=angular", "method.inter.pool_threshold=sampled", "method.inter.pool_sample=16"
    )
    for i, mode in enumerate(["hard", "random", "semieasy"]):
        m.inter_cfg.neg_sampling = mode  # this method's own config copy
        ((loss, logs),) = _run(m, 1, start=i)
        assert torch.isfinite(loss) and torch.isfinite(logs["loss_inter"])
    _check_state(m)


def test_npid_intra_branch():
    m = _method(*LIGHT, "method.intra.kind=npid", "method.inter.bank_dtype=bfloat16")
    assert not hasattr(m, "encoder_k") and "queue" not in m.state_dict()
    assert m.bank.features.dtype == torch.bfloat16
    for loss, logs in _run(m, 3):
        assert torch.isfinite(loss) and "loss_inter" in logs
    f = m.bank.features.float()
    assert torch.allclose(f.norm(dim=1), torch.ones(N), atol=1e-2)


def test_offline_labels_recluster_on_schedule():
    m = _method(*LIGHT, "method.inter.labels=offline", "method.inter.recluster_every=2")
    ctx = _ctx(_images(seed=3))
    before = m.labels.labels.clone()
    m.on_epoch_start(1, ctx)  # not a re-clustering epoch
    assert int(m.labels_epoch) == 0 and torch.equal(before, m.labels.labels)
    _run(m, 2, epoch=1)
    assert torch.equal(before, m.labels.labels)  # offline labels do not move during the epoch
    m.on_epoch_start(2, ctx)
    assert int(m.labels_epoch) == 2
    _check_state(m)


def test_effective_sizes():
    assert effective_num_clusters(10000, 1_281_167, 20, True) == 10000
    assert effective_num_clusters(500, 1000, 20, True) == 25
    assert effective_num_clusters(500, 100, 20, False) == 50
    assert effective_pool_size(128000, 0.0, 1_281_167) == 128000
    assert effective_pool_size(128000, 0.1, 50000) == 5000
    assert effective_pool_size(128000, 0.0, 1000) == 1000
