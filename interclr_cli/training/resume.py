"""Resuming a training run: which checkpoint, which config, and the loop's restored position.

One helper for every training command (pretrain, finetune): ``--resume`` alone means the latest
checkpoint of ``--out``; ``--resume PATH`` a run folder (its latest checkpoint) or a checkpoint
file. The run's own ``config.yaml`` is the base config and overrides apply on top; every rank
checks that it reads the same checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import yaml

from ..config.loader import apply_overrides, config_from_mapping, to_mapping, validate
from ..config.schema import Config
from ..errors import UserError
from ..runtime import dist
from .checkpoint import (
    TrainingCheckpoint,
    check_compatible,
    list_checkpoints,
    load_optimizer,
    restore_rng,
    state_mismatch,
)
from .loop import Position
from .optim import resolve_batch

log = logging.getLogger("interclr")

#: ``--resume`` given without a value (the CLI fills this in): the latest checkpoint of ``--out``.
LATEST = "__latest__"


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint (by global step) in ``run_dir/checkpoints``; a UserError if none."""
    ckpts = list_checkpoints(Path(run_dir) / "checkpoints")
    if not ckpts:
        raise UserError(f"no checkpoint to resume in {run_dir}/checkpoints; start the run again with --force")
    return ckpts[-1]


def load_run_config(run_dir: Path) -> dict:
    """The mapping in ``run_dir/config.yaml``; a UserError when it is unreadable."""
    path = Path(run_dir) / "config.yaml"
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read {path} ({e}); is this an interclr run folder?") from None


def resolve_resume(resume: str, out: Optional[str]) -> tuple[Path, Path]:
    """(run folder, checkpoint file) for ``--resume`` (latest in --out) or ``--resume PATH``."""
    if resume == LATEST:
        if not out:
            raise UserError(
                "--resume without a path needs --out RUN_FOLDER (or give --resume PATH to a run folder or checkpoint)"
            )
        run_dir = Path(out)
        return run_dir, latest_checkpoint(run_dir)
    p = Path(resume)
    if p.is_dir():
        return (Path(out) if out else p), latest_checkpoint(p)
    if not p.exists():
        raise UserError(f"--resume {p} does not exist; give a run folder or a .safetensors checkpoint")
    run_dir = Path(out) if out else (p.parent.parent if p.parent.name == "checkpoints" else p.parent)
    return run_dir, p


def open_resume(
    resume: str, out: Optional[str], overrides: list[str], *, kind: str, force: bool
) -> tuple[Path, TrainingCheckpoint, Config]:
    """The run folder, its checkpoint (validated, the same on every rank, of ``kind``) and the
    config to continue with: the run's ``config.yaml`` (else the checkpoint's) plus ``overrides``.
    Keys that change tensor shapes must agree with the checkpoint."""
    if force:
        raise UserError("--resume and --force contradict each other; use one")
    run_dir, path = resolve_resume(resume, out)
    ck = TrainingCheckpoint(path)
    dist.check_same((ck.path.name, ck.step), "the checkpoint to resume from")
    if ck.kind != kind:
        raise UserError(
            f"{ck.path} is a {ck.kind} checkpoint; --resume continues a {kind} run (give its folder or one of its checkpoints)"
        )
    base = load_run_config(run_dir) if (run_dir / "config.yaml").is_file() else ck.config
    cfg = config_from_mapping(apply_overrides(base, overrides))
    validate(cfg)
    resolve_batch(cfg, dist.world_size())  # global_batch: this launch's per-process share
    check_compatible(ck.config, to_mapping(cfg), ck.path)
    return run_dir, ck, cfg


def load_model_state(module: torch.nn.Module, state: dict[str, torch.Tensor], ck: TrainingCheckpoint) -> None:
    """``module.load_state_dict(state)`` with every tensor present and of the right shape, else a
    one-line UserError naming the first mismatch."""
    detail = state_mismatch(module, state)
    if detail:
        raise UserError(
            f"checkpoint {ck.path.name} does not match the model ({detail}); resume with the run's own data and config"
        )
    module.load_state_dict(state)


def restore_training(ck: TrainingCheckpoint, optimizer: torch.optim.Optimizer) -> Position:
    """Restore the optimizer and every RNG state from ``ck``; the position to continue from."""
    load_optimizer(optimizer, ck.tensors, ck.optimizer_meta)
    restore_rng(ck.tensors, ck.rng_meta)
    log.info(f"resumed from {ck.path} at epoch {ck.epoch}, step {ck.step}")
    return Position(ck.epoch, ck.step, ck.step_in_epoch)
