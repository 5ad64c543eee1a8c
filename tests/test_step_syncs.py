"""No host sync in a steady-state training step (InterCLR with either intra branch, MoCo v2, NPID).

A CPU run cannot tell a CUDA tensor from a CPU one, so the counter (benchmarks/_sync_count.py)
counts every call that would make the host wait for a GPU or turn a tensor into a Python value:
``item``, ``tolist``, ``__bool__``, ``int()``/``float()``, ``nonzero``, boolean-mask indexing,
``.cpu()``, ``.numpy()``, made by interclr's own code. A real pretraining run (loader, device
augmentation, the loop, the method, its maintenance) is counted from step 10 to step 30, with
logging steps out of the window; at most 0.1 such calls per step on average are allowed. On CUDA
the same steps also run under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_tree

from interclr_cli.commands.pretrain import run_pretrain
from interclr_cli.training import pretraining

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _sync_count import SyncCounter, sync_debug_error  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

START, STOP = 10, 30
METHODS = {
    "interclr": ["method.name=interclr", "method.intra.kind=moco"],
    "interclr-npid": ["method.name=interclr", "method.intra.kind=npid"],
    "mocov2": ["method.name=mocov2"],
    "npid": ["method.name=npid", "method.npid.num_negatives=32"],
}


def _count_steps(monkeypatch, tmp_path: Path, overrides: list[str]) -> dict:
    """Pretrain for STOP + 1 steps, counting syncs made during steps START .. STOP - 1."""
    data = make_tree(tmp_path / "data" / "train", 40)  # 160 images: 40 steps of 4 per epoch
    counter = SyncCounter()
    window: dict = {}
    forward = pretraining.PretrainTask.forward

    def counted_forward(self, batch, pos):
        if pos.step == START:
            counter.reset()
        if pos.step == STOP:
            window.update(direct=counter.direct, sites=dict(counter.sites))
        return forward(self, batch, pos)

    monkeypatch.setattr(pretraining.PretrainTask, "forward", counted_forward)
    ov = [
        f"data.root={data}",
        *TINY,
        "train.batch_size=4",
        f"train.max_steps={STOP + 1}",
        "train.log_every=1000",  # no logging step inside the window
        "train.ckpt_every=100",
        "data.augment_on=device",
        "method.queue_size=32",
        "method.inter.num_clusters=4",
        "method.inter.min_cluster_size=4",
        "method.inter.num_negatives=16",
        "method.inter.pool_fraction=0.25",
        "method.inter.centroid_update_every=5",
        "method.inter.kmeans_iters=3",
        "method.inter.kmeans_gpu=false",
        "method.intra.npid_negatives=32",
        *overrides,
    ]
    with counter:
        run_pretrain("r18-cifar", ov, out=str(tmp_path / "run"), resume=None, force=False, show_progress=False)
    return window


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_steady_state_step_makes_no_host_sync(monkeypatch, tmp_path, name):
    window = _count_steps(monkeypatch, tmp_path, METHODS[name])
    assert "direct" in window, "the run did not reach the end of the window"
    per_step = window["direct"] / (STOP - START)
    assert per_step <= 0.1, (per_step, window["sites"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (set_sync_debug_mode)")
def test_steps_run_under_cuda_sync_debug_error(monkeypatch, tmp_path):
    def steps():
        _count_steps(monkeypatch, tmp_path, METHODS["interclr"] + ["device=cuda"])

    out = sync_debug_error(steps)
    assert not out["raised"], out
