"""Detect a distributed launch and set up (and tear down) the process group.

Supported launchers:

* ``torchrun`` (single node or multi-node, also ``python -m torch.distributed.run``): it sets
  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
* SLURM ``srun`` with one task per GPU: ``SLURM_PROCID``, ``SLURM_NTASKS`` (or
  ``SLURM_STEP_NUM_TASKS``) and ``SLURM_LOCALID``; the master is ``MASTER_ADDR`` if set, else the
  first host of ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST``; the port is ``MASTER_PORT`` if
  set, else derived from the job id. ``INTERCLR_NO_SLURM=1`` turns SLURM detection off (for
  instance to run one process inside a multi-task allocation without srun).

Backend: with a CUDA device visible, ``cpu:gloo,cuda:nccl`` (NCCL for GPU tensors, gloo for the
odd CPU tensor; each rank uses GPU ``LOCAL_RANK`` modulo the visible count), otherwise ``gloo``.
``INTERCLR_DIST_BACKEND`` overrides it (a plain ``nccl`` keeps gloo for CPU tensors); ``INTERCLR_DIST_TIMEOUT`` (minutes, default 30) bounds how
long a rank waits for the others in a collective.

A world of one (``torchrun --nproc-per-node 1``) runs as a plain process.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as tdist

from ..errors import UserError

log = logging.getLogger("interclr")


@dataclass(frozen=True)
class LaunchInfo:
    """One process's place in a distributed launch, as read from the environment by :func:`detect`."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm


def _int(env: dict, *names: str) -> Optional[int]:
    for n in names:
        v = env.get(n, "").strip()
        if v:
            try:
                return int(v)
            except ValueError:
                raise UserError(f"environment variable {n}={v!r} is not an integer") from None
    return None


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: ``gpu[03-05,9],cpu1`` -> ``gpu03``."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]*)\])?", nodelist)
    if not m:
        raise UserError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR")
    prefix, ranges = m.group(1), m.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def detect(env: Optional[dict] = None) -> Optional[LaunchInfo]:
    """The launch described by the environment, or None for a plain (one-process) run."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        rank = _int(env, "RANK")
        local = _int(env, "LOCAL_RANK")
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT") or 29500
        launcher = "torchrun"
    elif "SLURM_PROCID" in env and not env.get("INTERCLR_NO_SLURM"):
        world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
        rank = _int(env, "SLURM_PROCID")
        local = _int(env, "SLURM_LOCALID")
        addr = env.get("MASTER_ADDR") or first_host(
            env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        )
        port = _int(env, "MASTER_PORT") or 20000 + (_int(env, "SLURM_JOB_ID", "SLURM_JOBID") or 0) % 20000
        launcher = "slurm"
    else:
        return None
    if world is None or rank is None:
        return None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} is outside the world of {world} processes ({launcher} environment)")
    return LaunchInfo(rank, world, rank if local is None else local, addr, port, launcher)


def default_backend() -> str:
    """``INTERCLR_DIST_BACKEND`` if set, else ``cpu:gloo,cuda:nccl`` with CUDA visible, else ``gloo``.

    A plain ``nccl`` becomes ``cpu:gloo,cuda:nccl``: some collectives carry CPU tensors (object
    broadcasts, host-side permutations), which NCCL cannot move."""
    forced = os.environ.get("INTERCLR_DIST_BACKEND", "").strip()
    if forced == "nccl":
        log.info("INTERCLR_DIST_BACKEND=nccl: using cpu:gloo,cuda:nccl (CPU tensors need gloo)")
        return "cpu:gloo,cuda:nccl"
    if forced:
        return forced
    if torch.cuda.is_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_distributed(cfg=None, *, env: Optional[dict] = None) -> bool:
    """Initialise the process group if this process was started by a distributed launcher.

    Idempotent; returns True when running distributed. ``cfg`` (a Config, or a device string)
    with ``device=cpu`` selects gloo even where CUDA is visible. Also silences non-zero ranks:
    no stdout (so only rank 0 prints ``--json``) and only warnings and errors on stderr.
    """
    if tdist.is_available() and tdist.is_initialized():
        return True
    info = detect(env)
    if info is None:
        return False
    if not tdist.is_available():
        raise UserError(
            "this PyTorch build has no torch.distributed; install a standard build to run on several processes"
        )
    device = getattr(cfg, "device", cfg) if cfg is not None else None
    backend = default_backend()
    if isinstance(device, str) and device == "cpu" and not os.environ.get("INTERCLR_DIST_BACKEND"):
        backend = "gloo"
    os.environ.setdefault("MASTER_ADDR", info.master_addr)
    os.environ.setdefault("MASTER_PORT", str(info.master_port))
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(info.rank), str(info.world_size)
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    minutes = float(os.environ.get("INTERCLR_DIST_TIMEOUT", "30") or 30)
    try:
        tdist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(minutes=minutes),
        )
    except (RuntimeError, ValueError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(
            f"cannot join the process group ({info.launcher}: rank {info.rank} of {info.world_size}, "
            f"master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}, backend {backend}): {reason}"
        ) from None
    quiet_non_main(info.rank)
    return True


def quiet_non_main(rank: int) -> None:
    """On ranks other than 0: stdout goes nowhere and logging keeps warnings and errors only."""
    if rank == 0:
        return
    sys.stdout = open(os.devnull, "w")
    logging.disable(logging.INFO)


def teardown() -> None:
    """Destroy the process group if one was created (safe to call always)."""
    if tdist.is_available() and tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception:  # pragma: no cover - best effort at exit
            pass
