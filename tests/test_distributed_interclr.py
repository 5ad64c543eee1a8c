"""InterCLR on 2 gloo ranks: the replicated bank, labels and centroids stay bit-identical, and a
2-rank run stopped mid-epoch and resumed ends where the uninterrupted 2-rank run ends.

The harness (spawned gloo ranks, one thread each) is the one of ``test_distributed.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY, make_tree
from test_distributed import WORLD, spawn

pytest.importorskip("interclr_cli.methods.interclr")

STATE = ("bank", "labels", "centroids", "counts", "queue", "labels_epoch")


def _overrides(data: Path) -> list[str]:
    # N = 16 (2 steps of 2 x 4 per epoch), K = 2, clusters below 4 members are dissolved and
    # refilled by a split, centroids every 2 steps, sampling with replacement (duplicate indices
    # inside a gathered batch)
    return [f"data.root={data}", "train.epochs=2", *TINY, "train.batch_size=4", "train.keep_last=10",
            "method.queue_size=16", "method.inter.num_clusters=2", "method.inter.min_cluster_size=4",
            "method.inter.num_negatives=6", "method.inter.pool_fraction=0.5", "method.inter.centroid_update_every=2",
            "method.inter.kmeans_iters=5", "method.inter.kmeans_gpu=false", "method.key_bn=shuffle"]


def _state(method) -> dict:
    return {"bank": method.bank.features.clone(), "labels": method.labels.labels.clone(),
            "centroids": method.labels.centroids.clone(), "counts": method.labels.counts.clone(),
            "queue": method.queue.clone(), "labels_epoch": method.labels_epoch.clone()}


def _interclr_worker(root: str, overrides: list[str]) -> dict:
    """Three runs in the same 2 processes: uninterrupted; stopped at step 3 (mid-epoch 2); resumed."""
    from interclr_cli.engine import trainer
    from interclr_cli.engine.pretrain import run_pretrain

    built = []
    build = trainer.build_method
    trainer.build_method = lambda cfg, n: built.append(build(cfg, n)) or built[-1]
    common = dict(force=False, show_progress=False)
    out: dict = {}
    out["ref"] = run_pretrain("r18-cifar", overrides, out=f"{root}/ref", resume=None, **common)
    out["ref_state"] = _state(built[-1])
    out["part"] = run_pretrain("r18-cifar", overrides + ["train.max_steps=3"], out=f"{root}/part", resume=None, **common)
    out["part_state"] = _state(built[-1])
    out["resumed"] = run_pretrain(None, ["train.max_steps=0"], out=f"{root}/part", resume="__latest__", **common)
    out["resumed_state"] = _state(built[-1])
    return out


def _ckpt(path) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if k.startswith(("model.", "optim.", "method."))}


@pytest.fixture(scope="module")
def interclr_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interclr_dist")
    data = make_tree(tmp / "data" / "train", 4)  # 16 images
    return spawn(tmp, _interclr_worker, str(tmp), _overrides(data))


def test_bank_labels_and_centroids_are_bit_identical_on_both_ranks(interclr_runs):
    r0, r1 = interclr_runs
    assert r0["ref"]["steps"] == 4 and r0["ref"]["method"] == "interclr"
    for run in ("ref_state", "part_state", "resumed_state"):
        for k in STATE:
            assert torch.equal(r0[run][k], r1[run][k]), (run, k)
    s = r0["ref_state"]
    assert int(s["counts"].sum()) == s["labels"].numel() == 16
    assert torch.equal(s["counts"], torch.bincount(s["labels"], minlength=2))
    assert int(s["counts"].min()) >= 4  # small clusters were dissolved and refilled identically
    assert torch.allclose(s["bank"].norm(dim=1), torch.ones(16), atol=1e-5)


def test_stopped_and_resumed_two_rank_run_matches_uninterrupted(interclr_runs):
    r0, r1 = interclr_runs
    assert r0["part"]["steps"] == 3 and r0["resumed"]["steps"] == 4
    for r in (r0, r1):
        for k in STATE:
            assert torch.equal(r["resumed_state"][k], r["ref_state"][k]), k
    a, b = _ckpt(r0["ref"]["checkpoint"]), _ckpt(r0["resumed"]["checkpoint"])
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]
