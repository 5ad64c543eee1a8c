"""torch.distributed with 2 gloo processes on the CPU.

Workers run in processes started with ``torch.multiprocessing.spawn`` (one thread each, so two
ranks share the 2 cores), or with ``python -m torch.distributed.run`` / a SLURM-like environment
for the end-to-end launcher tests. Every worker returns a picklable result the test compares.

What is checked:
* launch detection (torchrun / SLURM variables, node lists);
* autograd-aware gathers give the one-process gradient; a plain all_gather loses it and a plain
  all_reduce scales it by 1/world (after DDP's averaging);
* shuffle-BN equals its definition; the gloo SyncBatchNorm equals one BatchNorm on the global batch;
* a 2-rank MoCo step (DDP) has the loss and gradients of a 1-process step on the same global batch
  (BatchNorm in eval mode, or synchronised), and the queue gets the keys in global-batch order;
* a 2-rank pretraining run writes files from rank 0 only; killed with SIGKILL under torchrun and
  resumed (through a SLURM-style launch) it ends bit-identical to the uninterrupted 2-rank run;
* InterCLR: after N steps the memory bank, labels, counts and centroids are bit-identical on both
  ranks (cluster splits included), and a 2-rank run stopped mid-epoch and resumed ends
  bit-identical to the uninterrupted 2-rank run;
* downstream commands on 2 ranks against one process on the same global batch: knn and cluster
  give the same numbers and assignments, linear-eval (both paths) the same layer, at the learning
  rate of the global batch; finetune with synchronised BatchNorm, stopped and resumed, the same
  network up to float noise; rank 1 writes nothing; rankme and export still refuse a launch.

All the spawned work shares one pair of processes (a module fixture): start-up is the main cost.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from conftest import TINY, make_tree, scratch
from dist_helpers import GradAverager, all_gather_with_grad

from interclr_cli.runtime import dist
from interclr_cli.runtime.launch import detect, first_host

WORLD = 2
ROOT = Path(__file__).resolve().parent.parent


# -- harness -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args: tuple, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
        INTERCLR_DIST_TIMEOUT="3",
    )
    torch.set_num_threads(1)
    from interclr_cli.runtime import launch

    assert launch.init_distributed()
    try:
        result = fn(*args)
    finally:
        launch.teardown()
    torch.save(result, f"{out}.rank{rank}")


def spawn(tmp_path: Path, fn, *args, world: int = WORLD) -> list:
    """Run ``fn(*args)`` on ``world`` gloo ranks; returns each rank's return value."""
    out = str(tmp_path / f"result-{fn.__name__}")
    mp.spawn(_entry, args=(world, free_port(), fn, args, out), nprocs=world, join=True)
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(world)]


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process it started (torchrun's workers run in their own sessions)."""
    for p in descendants(pid)[::-1] + [pid]:  # workers first
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "INTERCLR_DEBUG"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), INTERCLR_DIST_TIMEOUT="3")
    env.update(extra)
    return env


# -- launch detection (no processes) ---------------------------------------------------------------


def test_a_plain_nccl_backend_keeps_gloo_for_cpu_tensors(monkeypatch):
    from interclr_cli.runtime.launch import default_backend

    monkeypatch.setenv("INTERCLR_DIST_BACKEND", "nccl")
    assert default_backend() == "cpu:gloo,cuda:nccl"
    monkeypatch.setenv("INTERCLR_DIST_BACKEND", "gloo")
    assert default_backend() == "gloo"


def test_detects_torchrun_and_slurm_environments():
    assert detect({}) is None
    assert detect({"RANK": "0", "WORLD_SIZE": "1"}) is None  # a world of one runs as a plain process
    t = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (t.rank, t.world_size, t.local_rank, t.master_addr, t.master_port, t.launcher) == (
        3,
        8,
        1,
        "n1",
        1234,
        "torchrun",
    )
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-08,11],cpu01",
    }
    s = detect(slurm)
    assert (s.rank, s.world_size, s.local_rank, s.master_addr, s.launcher) == (5, 8, 1, "gpu07", "slurm")
    assert s.master_port == 20000 + 4242 % 20000
    assert detect({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "777"}).master_addr == "head"
    assert detect({**slurm, "SLURM_NTASKS": "1"}) is None  # srun -n 1, or a one-task allocation
    assert detect({**slurm, "INTERCLR_NO_SLURM": "1"}) is None
    assert detect({**slurm, "RANK": "0", "WORLD_SIZE": "2"}).launcher == "torchrun"  # torchrun inside srun wins
    assert first_host("node001") == "node001" and first_host("a[9-12]") == "a9" and first_host("x-1,y") == "x-1"


# -- collectives ----------------------------------------------------------------------------------


def _contrastive(z: torch.Tensor) -> torch.Tensor:
    """A loss that couples every row with every other one (like InfoNCE over a gathered batch)."""
    z = F.normalize(z, dim=1)
    logits = z @ z.t() / 0.5
    logits = logits - 1e4 * torch.eye(z.shape[0])
    target = torch.arange(z.shape[0]) ^ 1  # pairs (0,1), (2,3), ...
    return F.cross_entropy(logits, target)


def _extract_means(root: str):
    """Sharded feature extraction: per-image channel means and a second output, in index order."""
    from interclr_cli.config.schema import DataConfig
    from interclr_cli.data import eval_transform, index_source
    from interclr_cli.training.features import extract

    index = index_source(root, "imagefolder")
    tf = eval_transform(DataConfig(image_size=16, eval_resize=16))
    (a, b), labels = extract(
        lambda x: (x.mean((2, 3)), x.amax((1, 2, 3)).unsqueeze(1)),
        index,
        tf,
        device=torch.device("cpu"),
        batch_size=2,
        num_workers=0,
    )
    return a, b, labels


def _collectives_worker(images: str):
    import torch.distributed as tdist

    from interclr_cli.runtime.ddp import DistBatchNorm, _convert, check_replicas
    from interclr_cli.runtime.shuffle_bn import shuffled_forward

    r, w, b = dist.rank(), dist.world_size(), 4
    res: dict = {}
    torch.manual_seed(0)
    data = torch.randn(b * w, 5)
    lin = nn.Linear(5, 6)
    mine = data[r * b : (r + 1) * b]

    def averaged_grad(loss):  # what DDP does to a parameter gradient
        lin.zero_grad()
        loss.backward()
        return dist.all_reduce_mean(lin.weight.grad)

    # every rank computes the loss of the gathered global batch
    res["gather_with_grad"] = averaged_grad(_contrastive(all_gather_with_grad(lin(mine))))
    # a plain all_gather returns tensors cut from the graph
    outs = [torch.empty(b, 6) for _ in range(w)]
    tdist.all_gather(outs, lin(mine))
    res["plain_gather_requires_grad"] = any(o.requires_grad for o in outs)
    # sums over ranks: autograd-aware vs plain in-place all_reduce (identity backward)
    res["reduce_with_grad"] = averaged_grad(_contrastive(dist.all_reduce_sum_with_grad(lin(mine))))
    y = lin(mine).clone()
    tdist.all_reduce(y)
    res["plain_reduce"] = averaged_grad(_contrastive(y))
    # uneven rows
    res["rows"] = dist.all_gather_rows(torch.full((r + 1, 2), float(r)))

    # shuffle-BN against its definition, with a train-mode BatchNorm
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    ref_net = copy.deepcopy(net)
    x = torch.randn(b * w, 3, 6, 6)
    perm = torch.randperm(b * w, generator=torch.Generator().manual_seed(7))
    got = shuffled_forward(net, x[r * b : (r + 1) * b], perm)
    ref = torch.empty(b * w, 3)
    with torch.no_grad():
        for s in range(w):
            idx = torch.sort(perm[s * b : (s + 1) * b]).values  # the images rank s normalises together
            out = ref_net(x[idx]) if s == r else copy.deepcopy(ref_net)(x[idx])
            ref[idx] = out
    res["shuffle_equal"] = torch.equal(got, ref[r * b : (r + 1) * b])
    res["shuffle_running_mean_equal"] = torch.equal(net[1].running_mean, ref_net[1].running_mean)
    with torch.no_grad():
        res["shuffle_differs_from_local_bn"] = not torch.allclose(got, copy.deepcopy(ref_net)(x[r * b : (r + 1) * b]))
    # without an explicit permutation: drawn in lockstep, broadcast from rank 0
    shuffled_forward(net, x[r * b : (r + 1) * b])
    res["rng_state"] = torch.get_rng_state()

    # gloo SyncBatchNorm: output, gradients and running statistics of one BN over the global batch
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    single = copy.deepcopy(net)
    synced = _convert(copy.deepcopy(net), DistBatchNorm)
    res["sync_bn_converted"] = isinstance(synced[1], DistBatchNorm)
    x = torch.randn(b * w, 3, 6, 6)
    out = synced(x[r * b : (r + 1) * b])
    out.square().mean().backward()
    grads = [dist.all_reduce_mean(p.grad) for p in synced.parameters()]
    ref = single(x)
    ref.square().mean().backward()
    res["sync_bn_out"] = (out, ref[r * b : (r + 1) * b].detach())
    res["sync_bn_grads"] = (grads, [p.grad for p in single.parameters()])
    res["sync_bn_stats"] = (
        (synced[1].running_mean, synced[1].running_var),
        (single[1].running_mean, single[1].running_var),
    )

    # replica check: names what differs between ranks
    mod = nn.Module()
    mod.register_buffer("same", torch.ones(3))
    mod.register_buffer("mine", torch.full((3,), float(r)))
    res["replicas"] = check_replicas(mod)
    res["extract"] = _extract_means(images)
    res["images"] = images

    # rank 0 alone runs a function; its result, or its error, reaches every rank
    from interclr_cli.commands.common import single_process
    from interclr_cli.errors import UserError, WorkError

    res["main_only"] = dist.main_only(lambda: {"ran_on": dist.rank()})
    for exc in (UserError("bad --k"), ValueError("oops")):

        def boom(exc=exc):
            raise exc

        try:
            dist.main_only(boom)
        except (UserError, WorkError, ValueError) as e:
            res[f"main_only_{type(exc).__name__}"] = (type(e).__name__, str(e))
    refused = {}
    for command in ("knn", "cluster", "linear-eval", "finetune", "rankme", "export"):
        try:
            single_process(command)
            refused[command] = False
        except UserError:
            refused[command] = True
    res["refused"] = refused

    # the reference grads of the gather tests, computed without any collective
    lin.zero_grad()
    _contrastive(lin(data)).backward()
    res["true_gather_grad"] = lin.weight.grad.clone()
    lin.zero_grad()
    z = lin(data).view(w, b, 6).sum(0)
    _contrastive(z).backward()
    res["true_reduce_grad"] = lin.weight.grad.clone()
    return res


def test_collectives_gradients_shuffle_bn_sync_bn_and_sharded_extraction(ranks):
    r0, r1 = (r["collectives"] for r in ranks)
    ref = _extract_means(r0["images"])
    for r in (r0, r1):
        assert r["main_only"] == {"ran_on": 0}
        assert r["refused"] == {
            "knn": False,
            "cluster": False,
            "linear-eval": False,
            "finetune": False,
            "rankme": True,
            "export": True,
        }
    assert r0["main_only_UserError"] == r1["main_only_UserError"] == ("UserError", "bad --k")
    assert r0["main_only_ValueError"] == ("ValueError", "oops")  # rank 0 raises its own error
    assert r1["main_only_ValueError"] == ("WorkError", "rank 0 failed: ValueError: oops")  # the others a WorkError
    for r in (r0, r1):
        assert r["replicas"] == ["mine"]
        assert all(torch.equal(g, e) for g, e in zip(r["extract"], ref)), "sharded extraction differs"
        assert r["extract"][0].shape == (11, 3)
    for r in (r0, r1):
        assert torch.allclose(r["gather_with_grad"], r["true_gather_grad"], rtol=1e-5, atol=1e-7)
        assert r["plain_gather_requires_grad"] is False  # the gradient is dropped
        assert torch.allclose(r["reduce_with_grad"], r["true_reduce_grad"], rtol=1e-5, atol=1e-7)
        # identity backward + DDP averaging = 1/world of the true gradient
        assert torch.allclose(r["plain_reduce"], r["true_reduce_grad"] / WORLD, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(r["plain_reduce"], r["true_reduce_grad"], rtol=1e-3)
        assert torch.equal(r["rows"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
        assert r["shuffle_equal"] and r["shuffle_running_mean_equal"] and r["shuffle_differs_from_local_bn"]
        assert r["sync_bn_converted"]
        got, ref = r["sync_bn_out"]
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
        for g, e in zip(*r["sync_bn_grads"]):
            assert torch.allclose(g, e, rtol=1e-4, atol=1e-7)
        for g, e in zip(*r["sync_bn_stats"]):
            assert torch.allclose(g, e, rtol=1e-5, atol=1e-7)
    assert torch.equal(r0["gather_with_grad"], r1["gather_with_grad"])
    assert torch.equal(r0["rng_state"], r1["rng_state"])  # the ranks' generators stay in lockstep


# -- a MoCo v2 step: 2 ranks vs 1 process on the same global batch ---------------------------------

MOCO = [*TINY, "method.queue_size=16", "data.image_size=16", "model.embed_dim=16", "optim.lr=0.1"]
B = 4  # per rank


def _global_batch():
    g = torch.Generator().manual_seed(123)
    n = B * WORLD
    return {
        "view1": torch.randn(n, 3, 16, 16, generator=g),
        "view2": torch.randn(n, 3, 16, 16, generator=g),
        "index": torch.arange(n),
        "label": torch.zeros(n, dtype=torch.long),
    }


def _moco_step(overrides: list[str], bn_eval: bool, kind: str = "ddp") -> dict:
    """One optimizer step of MoCo v2; distributed when the process group is up."""
    from interclr_cli.config import load_config
    from interclr_cli.methods import build_method
    from interclr_cli.runtime.ddp import convert_sync_bn, wrap_ddp
    from interclr_cli.training.optim import build_optimizer

    cfg = load_config("mocov2-r18-cifar", MOCO + overrides)
    torch.manual_seed(0)
    method = build_method(cfg, 100)
    method = convert_sync_bn(method, sync_bn=cfg.model.sync_bn, key_bn=cfg.method.key_bn, device=torch.device("cpu"))
    method.train()
    if bn_eval:
        for m in method.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    opt = build_optimizer(cfg.optim, [{"params": method.trainable_parameters()}], cfg.optim.lr)
    if not dist.is_dist():
        runner = method
    else:
        runner = GradAverager(method) if kind == "allreduce" else wrap_ddp(method, torch.device("cpu"))
    batch = _global_batch()
    r = dist.rank()
    n = B if dist.is_dist() else B * WORLD
    local = {k: v[r * n : (r + 1) * n] for k, v in batch.items()}
    loss, _ = runner.training_step(local, 0, 0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if isinstance(runner, GradAverager):  # DDP reduced the gradients during backward
        runner.sync_gradients()
    grads = {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}
    opt.step()
    method.after_optimizer_step(0)
    return {
        "loss": dist.all_reduce_mean(loss.detach()),
        "grads": grads,
        "queue": method.queue.clone(),
        "bn": {k: v.clone() for k, v in method.state_dict().items() if "running" in k},
    }


SCENARIOS = {
    "bn_eval": ([], True, "ddp"),
    "bn_eval_allreduce": ([], True, "allreduce"),
    "sync_bn": (["model.sync_bn=true", "method.key_bn=sync"], False, "ddp"),
}


def _moco_worker():
    return {name: _moco_step(*spec) for name, spec in SCENARIOS.items()}


def test_two_rank_moco_step_equals_one_process_step(ranks):
    ranks = [r["moco"] for r in ranks]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        refs = {name: _moco_step(*spec) for name, spec in SCENARIOS.items()}
    finally:
        torch.set_num_threads(before)
    for name, ref in refs.items():
        for rk, got in enumerate(r[name] for r in ranks):
            where = f"{name}, rank {rk}"
            assert torch.allclose(got["loss"], ref["loss"], rtol=1e-6, atol=1e-7), (where, got["loss"], ref["loss"])
            assert got["grads"].keys() == ref["grads"].keys(), where
            worst = max(
                ((got["grads"][k] - ref["grads"][k]).abs().max() / ref["grads"][k].abs().max().clamp(min=1e-12)).item()
                for k in ref["grads"]
            )
            assert worst < 1e-4, (where, worst)
            # keys are gathered in rank order = the global batch order
            qdiff = (got["queue"] - ref["queue"]).abs().max().item()
            assert qdiff < (1e-6 if name.startswith("bn_eval") else 2e-5), (where, qdiff)
        assert torch.equal(ranks[0][name]["queue"], ranks[1][name]["queue"]), name
        assert all(torch.equal(ranks[0][name]["grads"][k], ranks[1][name]["grads"][k]) for k in ref["grads"]), name
    for k, v in refs["sync_bn"]["bn"].items():  # synchronised BN statistics = global-batch statistics
        assert torch.allclose(ranks[0]["sync_bn"]["bn"][k], v, rtol=1e-5, atol=1e-6), k
    # DDP and the flat all-reduce agree
    for k, g in ranks[0]["bn_eval"]["grads"].items():
        assert torch.allclose(g, ranks[0]["bn_eval_allreduce"]["grads"][k], rtol=1e-6, atol=1e-9), k


# -- end to end: rank-0-only files, kill and resume ----------------------------------------------


def _pretrain_overrides(data: Path, monitors: bool) -> list[str]:
    ov = [
        f"data.root={data}",
        "train.epochs=1",
        *TINY,
        "train.batch_size=4",
        "train.ckpt_every_steps=2",
        "train.keep_last=10",
        "method.key_bn=shuffle",
    ]
    if monitors:  # monitors never change the training state (eval mode, RNG-neutral extraction)
        ov += [
            "monitor.every=1",
            "monitor.at_start=true",
            "monitor.rankme_samples=16",
            "monitor.knn_max_train=32",
            "monitor.knn_k=5",
        ]
    return ov


def _record_writes(watch: str) -> list:
    """On ranks other than 0: a list that collects every file created or changed under ``watch``
    or as one of interclr's temporary files (audit hooks stay for the life of the process)."""
    import tempfile

    events: list = []
    watched = (watch, os.path.join(tempfile.gettempdir(), "interclr-"))  # the run folder, interclr's temp files
    if dist.rank() != 0:

        def hook(name, args):
            if name == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
                path, mode, flags = args[0], args[1], args[2]
                writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                    mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
                )
                if writes and str(os.fsdecode(path)).startswith(watched):
                    events.append((name, os.fsdecode(path)))
            elif name in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.truncate") and args:
                if str(os.fsdecode(args[0])).startswith(watched):
                    events.append((name, os.fsdecode(args[0])))

        sys.addaudithook(hook)
    return events


def _pretrain_worker(out: str, overrides: list[str], watch: str):
    """run_pretrain on every rank; rank 1 records every file it creates or changes under ``watch``."""
    from interclr_cli.commands.pretrain import run_pretrain

    events = _record_writes(watch)
    summary = run_pretrain("mocov2-r18-cifar", overrides, out=out, resume=None, force=False, show_progress=False)
    return {"summary": summary, "events": list(events)}


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if k.startswith(("model.", "optim.", "method."))}


def _global_batch_overrides(data: Path) -> list[str]:
    ov = [o for o in _pretrain_overrides(data, False) if not o.startswith("train.ckpt_every_steps")]
    return ov + ["train.global_batch=8"]  # given with train.batch_size: global_batch wins


def _run_logging(fn, *args, **kwargs) -> tuple:
    """``fn(...)`` and the "processes x per process = global" lines it logged."""
    import logging

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: lines.append(r.getMessage())
    logger = logging.getLogger("interclr")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        out = fn(*args, **kwargs)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, [ln for ln in lines if "processes x per process = global" in ln]


def _global_batch_worker(data: str, out: str) -> dict:
    from interclr_cli.commands.pretrain import run_pretrain

    summary, lines = _run_logging(
        run_pretrain,
        "mocov2-r18-cifar",
        _global_batch_overrides(Path(data)),
        out=out,
        resume=None,
        force=False,
        show_progress=False,
    )
    return {"summary": summary, "lines": lines}


def _force_worker(root: str) -> str:
    """--force on 2 ranks while rank 0's delete is slow (config.yaml goes first): rank 1, slower to
    inspect the folder, must still see the whole run folder (or nothing), never half of it."""
    import shutil

    from interclr_cli.training import rundir

    path = Path(root) / "forced"
    if dist.is_main():
        (path / "checkpoints").mkdir(parents=True)
        (path / rundir.RUN_MARKER).write_text("name: x\n")
        (path / "checkpoints" / "ckpt.safetensors").write_bytes(b"x")
    dist.barrier()
    check, rmtree = rundir.check_run_dir, shutil.rmtree

    def slow_check(p, force):
        if dist.rank() == 1:
            time.sleep(0.5)
        return check(p, force=force)

    def slow_rmtree(p, *a, **k):
        (Path(p) / rundir.RUN_MARKER).unlink()
        time.sleep(1.0)
        return rmtree(p, *a, **k)

    rundir.check_run_dir, rundir.shutil.rmtree = slow_check, slow_rmtree
    try:
        rundir.prepare_run_dir(path, resume=False, force=True)
        return "ok"
    except Exception as e:  # noqa: BLE001  (the test compares the outcome of both ranks)
        return f"{type(e).__name__}: {e}"
    finally:
        rundir.check_run_dir, rundir.shutil.rmtree = check, rmtree


def _labels_init_worker() -> dict:
    """OnlineLabels.init on bank rows that differ in the last bits between ranks (as float sums on
    a GPU may): the centroids must still be rank-identical, so check_replicas stays quiet."""
    from interclr_cli.memory import OnlineLabels
    from interclr_cli.runtime.ddp import check_replicas

    g = torch.Generator().manual_seed(5)
    feats = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    feats = feats + 1e-6 * dist.rank()  # rank-dependent rounding
    lab = OnlineLabels(40, 4, 8, min_cluster_size=0)
    lab.init(torch.arange(40) % 4, feats)
    return {"centroids": lab.centroids.clone(), "differ": check_replicas(lab)}


def _all_worker(
    images: str,
    data: str,
    ref_dir: str,
    watch: str,
    interclr_root: str,
    interclr_data: str,
    down_data: str,
    down_out: str,
    corrupt_data: str,
) -> dict:
    """Everything that runs in the one pair of spawned ranks (process start-up is the main cost)."""
    out = {
        "collectives": _collectives_worker(images),
        "moco": _moco_worker(),
        "pretrain": _pretrain_worker(ref_dir, _pretrain_overrides(Path(data), True), watch),
        "downstream": _downstream_worker(down_data, down_out),
        "labels_init": _labels_init_worker(),
        "force": _force_worker(watch),
        "global_batch": _global_batch_worker(data, f"{watch}/global-batch"),
    }
    try:
        import interclr_cli.methods.interclr  # noqa: F401  (being written in parallel)
    except ImportError:
        out["interclr"] = None
    else:
        out["interclr"] = _interclr_worker(interclr_root, _interclr_overrides(Path(interclr_data)))
        out["corrupt"] = _corrupt_worker(interclr_root, corrupt_data)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Iterator[list]:
    with scratch(tmp_path_factory, "dist") as tmp:
        images = make_tree(tmp / "images", 3, classes=4)
        (images / sorted(os.listdir(images))[-1] / "0002.jpg").unlink()  # 11 images: shards of 6 and 5
        data = make_tree(tmp / "e2e" / "data" / "train", 6)  # 24 images: 3 global batches of 8
        idata = make_tree(tmp / "interclr" / "data" / "train", 4)  # 16 images: 2 global batches of 8
        down = _downstream_data(tmp / "down" / "data")
        cdata = make_tree(tmp / "corrupt" / "data" / "train", 4)  # 16 images, 2 of them unreadable
        for c in sorted(os.listdir(cdata))[:2]:
            (cdata / c / sorted(os.listdir(cdata / c))[0]).write_bytes(b"not an image")
        yield spawn(
            tmp,
            _all_worker,
            str(images),
            str(data),
            str(tmp / "e2e" / "ref"),
            str(tmp / "e2e"),
            str(tmp / "interclr"),
            str(idata),
            str(down),
            str(tmp / "down" / "runs"),
            str(cdata),
        )


def test_only_rank0_writes_and_kill_resume_matches_uninterrupted(tmp_path, ranks):
    # 1) the uninterrupted 2-rank run (in the shared spawn), watching rank 1's file writes
    r0, r1 = (r["pretrain"] for r in ranks)
    ref_dir = Path(r0["summary"]["run_dir"])
    dist_data = ref_dir.parent / "data" / "train"
    assert r1["events"] == [], r1["events"][:5]
    s = r0["summary"]
    assert s["steps"] == 3 and s["epochs"] == 1 and "knn_top1" in s and "rankme" in s
    assert r1["summary"]["checkpoint"] == s["checkpoint"]
    recs = [json.loads(ln) for ln in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in recs].count("epoch") == 1 and recs[0]["type"] == "monitor"  # one writer
    ref_ckpt = Path(s["checkpoint"])

    # 2) the same run (without monitors) under torchrun, SIGKILLed after its first checkpoint
    ov = _pretrain_overrides(dist_data, False)
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(WORLD),
        "--master-port",
        str(free_port()),
        "-m",
        "interclr_cli",
        "pretrain",
        "--preset",
        "mocov2-r18-cifar",
        "--out",
        str(out),
        "--quiet",
        *ov,
    ]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    from interclr_cli.training.checkpoint import list_checkpoints

    deadline = time.time() + 120
    while time.time() < deadline and not list_checkpoints(out / "checkpoints") and proc.poll() is None:
        time.sleep(0.05)
    kill_tree(proc.pid)
    _, err = proc.communicate()
    ckpts = list_checkpoints(out / "checkpoints")
    assert ckpts, err.decode()[-2000:]
    assert ckpts[-1].name != ref_ckpt.name, "the run was not interrupted"

    # 3) resume it with 2 processes started the way srun starts them
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "interclr_cli", "pretrain", "--out", str(out), "--resume", "--json", "--quiet"],
            env=child_env(
                SLURM_PROCID=str(r),
                SLURM_NTASKS=str(WORLD),
                SLURM_LOCALID=str(r),
                SLURM_JOB_NODELIST="localhost",
                MASTER_PORT=str(port),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(WORLD)
    ]
    results = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in results]
    assert results[1][0] == "", "rank 1 printed on stdout"
    got = Path(json.loads(results[0][0])["checkpoint"])
    assert got.name == ref_ckpt.name
    a, b = _tensors(ref_ckpt), _tensors(got)
    assert a.keys() == b.keys()
    assert "model.encoder_q.backbone.conv1.weight" in a and not any(".module." in k for k in a)  # DDP left no prefix
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]


# -- InterCLR: replicated bank, labels and centroids; stop and resume ----------------------------

INTERCLR_STATE = ("bank", "labels", "centroids", "counts", "queue", "labels_epoch")


def _interclr_overrides(data: Path) -> list[str]:
    # N = 16 (2 steps of 2 x 4 per epoch), K = 2, clusters below 4 members are dissolved and
    # refilled by a split, centroids every 2 steps, sampling with replacement (duplicate indices
    # inside a gathered batch)
    return [
        f"data.root={data}",
        "train.epochs=2",
        *TINY,
        "train.batch_size=4",
        "train.keep_last=10",
        "method.queue_size=16",
        "method.inter.num_clusters=2",
        "method.inter.min_cluster_size=4",
        "method.inter.num_negatives=6",
        "method.inter.pool_fraction=0.5",
        "method.inter.centroid_update_every=2",
        "method.inter.kmeans_iters=5",
        "method.inter.kmeans_gpu=false",
        "method.key_bn=shuffle",
    ]


def _interclr_state(method) -> dict:
    return {
        "bank": method.bank.features.clone(),
        "labels": method.labels.labels.clone(),
        "centroids": method.labels.centroids.clone(),
        "counts": method.labels.counts.clone(),
        "queue": method.queue.clone(),
        "labels_epoch": method.labels_epoch.clone(),
    }


def _interclr_worker(root: str, overrides: list[str]) -> dict:
    """Three runs in the same 2 processes: uninterrupted; stopped at step 3 (mid-epoch 2); resumed."""
    from interclr_cli.commands.pretrain import run_pretrain
    from interclr_cli.training import pretraining

    built = []
    build = pretraining.build_method
    pretraining.build_method = lambda cfg, n: built.append(build(cfg, n)) or built[-1]
    common = dict(force=False, show_progress=False)
    out: dict = {}
    out["ref"] = run_pretrain("r18-cifar", overrides, out=f"{root}/ref", resume=None, **common)
    out["ref_state"] = _interclr_state(built[-1])
    out["part"] = run_pretrain(
        "r18-cifar", overrides + ["train.max_steps=3"], out=f"{root}/part", resume=None, **common
    )
    out["part_state"] = _interclr_state(built[-1])
    out["resumed"] = run_pretrain(None, ["train.max_steps=0"], out=f"{root}/part", resume="__latest__", **common)
    out["resumed_state"] = _interclr_state(built[-1])
    return out


def _corrupt_worker(root: str, data: str) -> dict:
    """InterCLR on 2 ranks over data with unreadable images: every rank must still step on a
    full batch (the gathers of keys and indices need equal shapes), so they are replaced."""
    from interclr_cli.commands.pretrain import run_pretrain
    from interclr_cli.training import pretraining

    built = []
    build = pretraining.build_method
    pretraining.build_method = lambda cfg, n: built.append(build(cfg, n)) or built[-1]
    try:
        summary = run_pretrain(
            "r18-cifar",
            _interclr_overrides(Path(data)) + ["data.replacement=false"],
            out=f"{root}/corrupt",
            resume=None,
            force=False,
            show_progress=False,
        )
    finally:
        pretraining.build_method = build
    return {"summary": summary, "state": _interclr_state(built[-1])}


def _interclr_ckpt(path) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if k.startswith(("model.", "optim.", "method."))}


@pytest.fixture
def interclr_runs(ranks):
    if ranks[0]["interclr"] is None:
        pytest.skip("interclr_cli.methods.interclr is not there yet")
    return [r["interclr"] for r in ranks]


def test_bank_labels_and_centroids_are_bit_identical_on_both_ranks(interclr_runs):
    r0, r1 = interclr_runs
    assert r0["ref"]["steps"] == 4 and r0["ref"]["method"] == "interclr"
    for run in ("ref_state", "part_state", "resumed_state"):
        for k in INTERCLR_STATE:
            assert torch.equal(r0[run][k], r1[run][k]), (run, k)
    s = r0["ref_state"]
    assert int(s["counts"].sum()) == s["labels"].numel() == 16
    assert torch.equal(s["counts"], torch.bincount(s["labels"], minlength=2))
    assert int(s["counts"].min()) >= 4  # small clusters were dissolved and refilled identically
    assert torch.allclose(s["bank"].norm(dim=1), torch.ones(16), atol=1e-5)


def test_global_batch_and_lr_are_the_same_on_one_and_two_ranks(tmp_path, ranks):
    from interclr_cli.commands.pretrain import run_pretrain

    two = ranks[0]["global_batch"]
    data = Path(ranks[0]["pretrain"]["summary"]["run_dir"]).parent / "data" / "train"
    one, lines = _run_logging(
        run_pretrain,
        "mocov2-r18-cifar",
        _global_batch_overrides(data),
        out=str(tmp_path / "one"),
        resume=None,
        force=False,
        show_progress=False,
    )
    assert two["lines"][0].startswith("batch 2 x 4 = 8 ") and lines[0].startswith("batch 1 x 8 = 8 ")
    assert two["lines"][0].split("; ")[1] == lines[0].split("; ")[1]  # "lr 0.001875 = 0.06 x 8/256 ..."
    assert one["steps"] == two["summary"]["steps"] == 3  # 24 images, 8 per step


def test_force_waits_for_every_rank_before_deleting(ranks):
    assert [r["force"] for r in ranks] == ["ok", "ok"]


def test_initial_centroids_are_rank_identical(ranks):
    r0, r1 = (r["labels_init"] for r in ranks)
    assert torch.equal(r0["centroids"], r1["centroids"])
    assert r0["differ"] == r1["differ"] == []
    g = torch.Generator().manual_seed(5)  # rank 0's centroids: the member means of its own rows
    feats = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    want = torch.stack([feats[c::4].mean(0) for c in range(4)])
    assert torch.allclose(r0["centroids"], want, atol=1e-6)


def test_unreadable_images_are_replaced_so_both_ranks_step_together(ranks):
    if ranks[0]["interclr"] is None:
        pytest.skip("interclr_cli.methods.interclr is not there yet")
    runs = [r["corrupt"] for r in ranks]
    for r in runs:  # 2 epochs without replacement: each unreadable file is drawn once per epoch
        assert r["summary"]["steps"] == 4 and r["summary"]["skipped"] == 4
    a, b = (r["state"] for r in runs)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_stopped_and_resumed_two_rank_run_matches_uninterrupted(interclr_runs):
    r0, r1 = interclr_runs
    assert r0["part"]["steps"] == 3 and r0["resumed"]["steps"] == 4
    for r in (r0, r1):
        for k in INTERCLR_STATE:
            assert torch.equal(r["resumed_state"][k], r["ref_state"][k]), k
    a, b = _interclr_ckpt(r0["ref"]["checkpoint"]), _interclr_ckpt(r0["resumed"]["checkpoint"])
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]


# -- downstream commands: 2 ranks vs 1 process on the same global batch ----------------------------

# lr 0.2 given for a global batch of 16: 0.1 for the global batch of 8 (1 x 8 or 2 x 4)
DOWN = [
    "data.image_size=16",
    "data.eval_resize=16",
    "data.num_workers=0",
    "device=cpu",
    "eval.feature_batch_size=64",
    "train.log_every=1",
    "optim.lr=0.2",
    "optim.reference_batch=16",
    "train.precision=none",  # float32: compared with one process up to float noise (not bf16's)
    "train.channels_last=false",  # the one-process reference in the same memory format as the ranks
]
GLOBAL_BATCH = 8
LINEAR = {
    "augmented": ["eval.cached_features=false"],
    "cached": ["eval.cached_features=true", "eval.cached_aug_copies=1"],
}


def _downstream_data(root: Path) -> Path:
    """train/: 4 classes x 4 (2 global batches of 8); test/: 11 images (extraction shards of 6 and 5)."""
    make_tree(root / "train", 4)
    test = make_tree(root / "test", 3, split="test")
    (test / sorted(os.listdir(test))[-1] / sorted(os.listdir(test / sorted(os.listdir(test))[-1]))[-1]).unlink()
    return root


def _downstream(data: str, out: str) -> dict:
    """linear-eval (both paths), knn, cluster and finetune (synchronised BatchNorm) on a random
    ResNet-18 with a global batch of 8; on 2 ranks the finetune run stops after its first epoch and
    is resumed. Distributed when the process group is up."""
    from interclr_cli.commands import run_cluster, run_finetune, run_knn, run_linear_eval

    ov = [f"data.root={data}", *DOWN, f"train.batch_size={GLOBAL_BATCH // dist.world_size()}"]
    kw = dict(force=False, show_progress=False)
    res = {}
    for name, extra in LINEAR.items():
        res[f"linear_{name}"] = run_linear_eval(
            "random:resnet18", "linear-r18-cifar", ov + ["train.epochs=2", *extra], out=f"{out}/linear-{name}", **kw
        )
    res["knn"] = run_knn("random:resnet18", "linear-r18-cifar", ov + ["eval.knn_k=[1,3,10]"], out=f"{out}/knn", **kw)
    res["cluster"] = run_cluster(
        "random:resnet18",
        "linear-r18-cifar",
        ov,
        out=f"{out}/cluster",
        k=4,
        pca=8,
        iters=10,
        sheet_clusters=2,
        sheet_images=2,
        **kw,
    )
    # a small lr: 4 steps of a random network at 16 px (1 x 1 maps in layer3/4) amplify float noise
    ft = ov + ["data.label_fraction=1.0", "model.sync_bn=true", "optim.lr=0.002", "train.keep_last=5"]
    if dist.is_dist():
        run_finetune("random:resnet18", "finetune-r18-cifar", ft + ["train.epochs=1"], out=f"{out}/finetune", **kw)
        res["finetune"] = run_finetune(None, None, ["train.epochs=2"], out=f"{out}/finetune", resume="__latest__", **kw)
    else:
        res["finetune"] = run_finetune(
            "random:resnet18", "finetune-r18-cifar", ft + ["train.epochs=2"], out=f"{out}/finetune", **kw
        )
    return res


def _downstream_worker(data: str, out: str) -> dict:
    events = _record_writes(out)
    return {"results": _downstream(data, out), "events": list(events), "data": data}


def _records(run: dict, kind: str) -> list[dict]:
    lines = (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


@pytest.fixture(scope="module")
def downstream(ranks, tmp_path_factory):
    """(rank 0's, rank 1's, one process's) results; the one-process runs here, on one thread."""
    r0, r1 = (r["downstream"] for r in ranks)
    before = torch.get_num_threads()
    with scratch(tmp_path_factory, "down-ref") as ref_dir:
        torch.set_num_threads(1)
        try:
            ref = _downstream(r0["data"], str(ref_dir))
        finally:
            torch.set_num_threads(before)
        yield r0, r1, ref


def test_two_rank_downstream_writes_from_rank0_only(downstream):
    r0, r1, _ = downstream
    assert r1["events"] == [], r1["events"][:5]
    runs = r0["results"]
    for name in ("linear_augmented", "linear_cached", "knn", "cluster", "finetune"):
        assert Path(runs[name]["run_dir"], "result.json").is_file(), name
        assert runs[name]["run_dir"] == r1["results"][name]["run_dir"], name  # rank 0 named the folder
    # one writer: every step and epoch is logged once (4 steps of the global batch over 2 epochs)
    assert [r["step"] for r in _records(runs["linear_augmented"], "step")] == [1, 2, 3, 4]
    assert [r["epoch"] for r in _records(runs["finetune"], "epoch")] == [1, 2]  # the second after --resume
    assert len(_records(runs["knn"], "knn")) == 1 and len(_records(runs["cluster"], "cluster")) == 1


def test_two_rank_knn_and_cluster_equal_one_process(downstream):
    r0, r1, ref = downstream
    assert r0["results"]["knn"]["top1"] == ref["knn"]["top1"] == r1["results"]["knn"]["top1"]
    assert r0["results"]["knn"]["num_val"] == 11
    got, want = r0["results"]["cluster"], ref["cluster"]
    for key in ("nmi", "ari", "ami", "purity", "accuracy", "empty_clusters", "largest_cluster", "num_images"):
        assert got[key] == want[key] == r1["results"]["cluster"][key], key
    assert got["objective"] == pytest.approx(want["objective"], rel=1e-5)

    def table(path):
        with open(path) as f:
            rows = list(csv.reader(f))[1:]
        return [(Path(p).name, Path(p).parent.name, int(c)) for p, c, _ in rows], torch.tensor(
            [float(d) for _, _, d in rows]
        )

    (a, da), (b, db) = table(got["assignments"]), table(want["assignments"])
    assert a == b and len(a) == 16  # every image, in dataset order, in the same cluster
    assert torch.allclose(da, db, atol=1e-5)
    from safetensors.torch import load_file

    ca, cb = load_file(got["centroids"]), load_file(want["centroids"])
    assert ca.keys() == cb.keys() == {"centroids", "pca.mean", "pca.components"}
    assert all(torch.allclose(ca[k], cb[k], atol=1e-5) for k in ca)


def test_two_rank_linear_eval_ends_with_the_one_process_layer(downstream):
    from safetensors.torch import load_file

    from interclr_cli.commands.linear_eval import new_linear

    r0, _, ref = downstream
    init = new_linear(512, 4, 0).weight
    for name in LINEAR:
        got, want = r0["results"][f"linear_{name}"], ref[f"linear_{name}"]
        a, b = load_file(got["checkpoint"]), load_file(want["checkpoint"])
        assert not torch.allclose(b["weight"], init, atol=1e-4), "the layer did not train"
        for k in ("weight", "bias"):
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), (name, k, (a[k] - b[k]).abs().max())
        # the learning rate of the global batch: 0.2 x 8 / 16, whatever the number of processes
        assert [e["lr"] for e in _records(got, "epoch")] == [pytest.approx(0.1)] * 2, name
        assert got["top1"] == pytest.approx(want["top1"]) and got["epochs"] == 2


def test_two_rank_finetune_with_sync_bn_and_resume_matches_one_process(downstream):
    from safetensors.torch import load_file

    r0, r1, ref = downstream
    got, want = r0["results"]["finetune"], ref["finetune"]
    assert got["steps"] == want["steps"] == 4 and got["epochs"] == want["epochs"] == 2
    assert (
        Path(got["checkpoint"]).name
        == Path(want["checkpoint"]).name
        == r1["results"]["finetune"]["checkpoint"].rsplit("/", 1)[-1]
    )
    a, b = load_file(got["checkpoint"]), load_file(want["checkpoint"])
    model = [k for k in b if k.startswith("model.")]
    assert model and set(model) == {k for k in a if k.startswith("model.")}  # no module. prefix from DDP
    # with synchronised BatchNorm (normalisation and running statistics over the global batch) the
    # 2-rank run is the one-process run up to float noise; per-rank BatchNorm would be off by O(1)
    worst = max(
        ((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp(min=1e-6)).item()
        for k in model
        if b[k].is_floating_point()
    )
    assert worst < 2e-4, worst
    from interclr_cli.commands.linear_eval import new_linear

    moved = (b["model.fc.weight"] - new_linear(512, 4, 0).weight).abs().max().item()
    assert (a["model.fc.weight"] - b["model.fc.weight"]).abs().max().item() < 1e-3 * moved  # it trained
    assert Path(got["subset_file"]).is_file()
