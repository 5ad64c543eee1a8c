"""Checkpoint I/O: one safetensors file per checkpoint, written atomically. No pickle, ever.

Tensor names are dotted paths: ``model.<state_dict key>`` (encoders, heads, queue, bank ...),
``optim.state.<param index>.<name>`` (e.g. ``momentum_buffer``), ``method.<name>`` (extra state
a method registers, such as a sampling generator) and ``rng.*``. The metadata (string to string,
as safetensors requires) holds JSON: the resolved config, epoch, global step, optimizer
hyper-parameters, Python/NumPy RNG states and the format version, plus ``interclr.digest``
(a SHA-256 of the tensor data, checked on every load; see :mod:`interclr_cli.runtime.safefile`).
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..runtime.safefile import read_tensors, write_tensors

FORMAT = "interclr-checkpoint"
FORMAT_VERSION = 1
EXPORT_FORMAT = "interclr-export"


def atomic_save(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], *, kept: str | None = None
) -> int:
    """Write a safetensors file with its digest, atomically (temporary file beside it, fsync,
    rename; see :func:`interclr_cli.runtime.safefile.write_tensors`); returns its size in bytes.
    A full disk or an unwritable folder is a one-line StorageError (exit 1) saying what is kept."""
    return write_tensors(Path(path), tensors, metadata, kept=kept)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor and the metadata, the digest checked (unless ``--no-verify``); any
    unreadable or damaged file is a one-line UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; give a .safetensors file (or use --resume with a run folder)")

    def unreadable(reason: str) -> UserError:
        return UserError(
            f"{path} is not a readable safetensors checkpoint (truncated or another format: {reason}); "
            "use a file written by interclr, or convert it with `interclr export --from-moco/--from-torchvision`"
        )

    return read_tensors(path, on_error=unreadable)


# --- RNG states -------------------------------------------------------------------------------


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    if "python" in meta:
        v, st, g = meta["python"]
        random.setstate((v, tuple(st), g))
    if "numpy" in meta:
        a, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((a, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- optimizer --------------------------------------------------------------------------------


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.state.{pid}.{name}"] = v
            elif v is not None:
                scalars[f"{pid}.{name}"] = v
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    pat = re.compile(r"^optim\.state\.(\d+)\.(.+)$")
    for k, v in tensors.items():
        m = pat.match(k)
        if m:
            state.setdefault(int(m.group(1)), {})[m.group(2)] = v
    for k, v in meta.get("scalars", {}).items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = meta["param_groups"]
    current = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
        raise UserError(
            "checkpoint optimizer does not match this model (different parameter groups); resume with the run's own config"
        )
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --- training checkpoints -----------------------------------------------------------------------


def save_training_checkpoint(
    path: Path,
    *,
    model_state: dict[str, torch.Tensor],
    extra_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    config: dict,
    epoch: int,
    step: int,
    step_in_epoch: int,
    kind: str = "pretrain",
    info: dict | None = None,
) -> None:
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update({f"method.{k}": v for k, v in extra_state.items()})
    opt_t, opt_meta = optimizer_tensors(optimizer)
    tensors.update(opt_t)
    rng_t, rng_meta = capture_rng()
    tensors.update(rng_t)
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "config": json.dumps(config),
        "epoch": str(epoch),
        "step": str(step),
        "step_in_epoch": str(step_in_epoch),
        "optimizer": json.dumps(opt_meta),
        "rng": json.dumps(rng_meta),
        "info": json.dumps(info or {}),
    }
    earlier = [c for c in list_checkpoints(Path(path).parent) if c.name != Path(path).name]
    kept = f"the previous checkpoint {earlier[-1]} is kept" if earlier else "no earlier checkpoint exists"
    atomic_save(tensors, path, meta, kept=kept)


class TrainingCheckpoint:
    """A parsed training checkpoint."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors, self.meta = read_safetensors(self.path)
        fmt = self.meta.get("format")
        if fmt != FORMAT:
            what = "an exported backbone" if fmt == EXPORT_FORMAT else "not an interclr training checkpoint"
            raise UserError(f"{self.path} is {what}; --resume needs a checkpoint written by `interclr pretrain`")
        version = int(self.meta.get("format_version", "0"))
        if version > FORMAT_VERSION:
            raise UserError(
                f"{self.path} has checkpoint format {version}, newer than this interclr ({FORMAT_VERSION}); upgrade interclr"
            )
        try:
            self.config = json.loads(self.meta["config"])
            self.epoch = int(self.meta["epoch"])
            self.step = int(self.meta["step"])
            self.step_in_epoch = int(self.meta.get("step_in_epoch", "0"))
            self.optimizer_meta = json.loads(self.meta["optimizer"])
            self.rng_meta = json.loads(self.meta["rng"])
            self.info = json.loads(self.meta.get("info", "{}"))
        except (KeyError, ValueError) as e:
            raise UserError(f"{self.path} has damaged metadata ({e}); use another checkpoint") from None
        self.kind = self.meta.get("kind", "pretrain")

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def checkpoint_name(epoch: int, step: int) -> str:
    return f"ckpt-e{epoch:04d}-s{step:08d}.safetensors"


_CKPT_RE = re.compile(r"^ckpt-e(\d+)-s(\d+)\.safetensors$")


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in a run's checkpoints/ folder, oldest first (by global step)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _CKPT_RE.match(p.name)
        if m:
            found.append((int(m.group(2)), int(m.group(1)), p))
    return [p for _, _, p in sorted(found)]


_TMP_RE = re.compile(r"^\.ckpt-e\d+-s\d+\.safetensors\.(\d+)\.tmp$")


def prune_checkpoints(folder: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints; also remove temporary files that another
    (killed) process left half-written (only one process writes a run's checkpoints)."""
    folder = Path(folder)
    ckpts = list_checkpoints(folder)
    stale = []
    for p in folder.iterdir() if folder.is_dir() else []:
        m = _TMP_RE.match(p.name)
        if m and int(m.group(1)) != os.getpid():
            stale.append(p)
    for p in ckpts[: max(0, len(ckpts) - keep_last)] + stale:
        try:
            p.unlink()
        except OSError:
            pass


# Config keys that change tensor shapes or meaning: a resume must agree on these.
STATE_KEYS = [
    "model.arch",
    "model.small_stem",
    "model.head_hidden",
    "model.embed_dim",
    "method.name",
    "method.queue_size",
    "method.intra.kind",
    "method.inter.num_clusters",
    "method.inter.bank_dtype",
]


def check_compatible(saved: dict, current: dict, path: Path) -> None:
    for key in STATE_KEYS:
        a, b = saved, current
        for p in key.split("."):
            a = a.get(p, {}) if isinstance(a, dict) else None
            b = b.get(p, {}) if isinstance(b, dict) else None
        if a != b:
            raise UserError(
                f"checkpoint {path.name} was trained with {key}={a!r} but the config says {key}={b!r}; "
                "resume with the run's own config or start a new run"
            )


def state_mismatch(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Why ``module.load_state_dict(state, strict=True)`` would fail, naming the first differently
    shaped, missing or unexpected tensor; None when every tensor is present with its shape."""
    want = module.state_dict()
    shape = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if shape:
        k = shape[0]
        return f"{k} has shape {tuple(state[k].shape)}, expected {tuple(want[k].shape)}"
    missing = [k for k in want if k not in state]
    if missing:
        return f"{len(missing)} tensors missing, e.g. {missing[0]}"
    extra = [k for k in state if k not in want]
    if extra:
        return f"{len(extra)} unexpected tensors, e.g. {extra[0]}"
    return None
