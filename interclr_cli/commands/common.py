"""What every downstream command shares: config resolution, run folders, splits, extraction."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..config.loader import apply_overrides, config_from_mapping, load_preset_mapping, to_yaml, validate
from ..config.schema import Config
from ..data import (
    EpochBatchSampler,
    ImageDataset,
    index_source,
    linear_train_transform,
    loader_from_config,
    resolve_eval_split,
)
from ..data.sources import FileIndex
from ..errors import UserError
from ..runtime import dist
from ..runtime.device import memory_format
from ..training.autochoice import channels_last_on, resolve_auto
from ..training.features import same_files
from ..training.optim import resolve_batch
from ..training.rundir import check_run_dir, default_run_dir, prepare_run_dir
from .loading import CheckpointInfo

log = logging.getLogger("interclr")

# Images at most this size count as CIFAR-sized when choosing a default preset.
SMALL_IMAGE = 64

#: command -> (preset for small images, preset for large images), used when --preset is absent.
DEFAULT_PRESETS = {
    "linear-eval": ("linear-r18-cifar", "linear-r50-imagenet"),
    "finetune": ("finetune-r18-cifar", "finetune-r50-imagenet-10pct"),
    "knn": ("linear-r18-cifar", "linear-r50-imagenet"),
    "cluster": ("linear-r18-cifar", "linear-r50-imagenet"),
    "rankme": ("linear-r18-cifar", "linear-r50-imagenet"),
    "export": ("linear-r18-cifar", "linear-r50-imagenet"),
}


def is_small(info: CheckpointInfo) -> bool:
    """Small-image settings: a small stem, or a training image size of at most 64 px."""
    size = info.image_size
    return bool(info.small_stem) or (size is not None and int(size) <= SMALL_IMAGE)


def default_preset(command: str, info: CheckpointInfo) -> str:
    small, large = DEFAULT_PRESETS[command]
    return small if is_small(info) else large


def resolve_config(command: str, preset: Optional[str], overrides: list[str], info: CheckpointInfo) -> Config:
    """The preset (or the command's default for this checkpoint) with overrides applied.

    The architecture comes from the checkpoint: ``model.arch``/``model.small_stem`` set by the
    preset or an override must agree with it (the error names both).
    """
    name = preset or default_preset(command, info)
    mapping = apply_overrides(load_preset_mapping(name), overrides)
    cfg = config_from_mapping(mapping)
    given = mapping.get("model") or {}
    for key in ("arch", "small_stem"):
        if key in given and getattr(cfg.model, key) != getattr(info, key):
            raise UserError(
                f"the checkpoint {info.source} is a {info.description} but the config sets model.{key}={getattr(cfg.model, key)} "
                f"(from --preset {name} or an override); drop model.{key}: the architecture always comes from the checkpoint"
            )
    cfg.model.arch, cfg.model.small_stem = info.arch, info.small_stem
    if info.embed_dim:
        cfg.model.embed_dim = int(info.embed_dim)
    if info.head_hidden:
        cfg.model.head_hidden = int(info.head_hidden)
    if not cfg.name:
        cfg.name = Path(name).stem
    validate(cfg)
    resolve_batch(cfg, dist.world_size())
    if not preset:
        log.info(
            "no --preset given: using %s (the default of %s for a %s%s)",
            name,
            command,
            info.description,
            f" trained at {info.image_size} px" if info.image_size else "",
        )
    return cfg


#: The commands that run on every process of a torchrun/srun launch (the others refuse one).
DISTRIBUTED = frozenset({"linear-eval", "finetune", "knn", "cluster"})


def single_process(command: str) -> None:
    if command not in DISTRIBUTED and dist.world_size() > 1:
        raise UserError(f"{command} runs in a single process (one GPU or the CPU); start it without torchrun/srun")


def refuse_early(command: str, out: Optional[str], force: bool) -> None:
    """Before any work: one process unless the command is distributed, and the refusal an
    existing ``--out`` would get."""
    single_process(command)
    if out:
        check_run_dir(Path(out), force=force)


def supervised_loader(index: FileIndex, cfg: Config, *, drop_last: bool):
    """(loader, sampler) of labelled training images with the linear-eval/finetune augmentation,
    each process on its slice of every global batch. Under a distributed launch an unreadable
    image is replaced by the next readable one, so no process is left without a batch to step on."""
    world = dist.world_size()
    dataset = ImageDataset(index, linear_train_transform(cfg.data), views=1, substitute=world > 1)
    sampler = EpochBatchSampler(
        len(index),
        cfg.train.batch_size,
        replacement=False,
        seed=cfg.seed,
        rank=dist.rank(),
        world_size=world,
        drop_last=drop_last,
    )
    return loader_from_config(dataset, sampler, cfg.data), sampler


def open_run(command: str, cfg: Config, out: Optional[str], force: bool, extra: Optional[dict] = None) -> Path:
    """Create ``--out`` or ``runs/<command>-<timestamp>`` (pretrain's refusal and --force rules)
    and write ``config.yaml`` (the run marker) and ``run.json`` (the command and its inputs).
    Distributed: rank 0 names, creates and writes the folder; every rank returns its path."""
    single_process(command)
    run_dir = Path(dist.broadcast_object(str(Path(out) if out else default_run_dir(command))))
    prepare_run_dir(run_dir, resume=False, force=force)
    if dist.is_main():
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        (run_dir / "run.json").write_text(
            json.dumps({"command": command, **(extra or {})}, indent=2, default=str) + "\n"
        )
    return run_dir


def close_run(run_dir: Path, result: dict) -> None:
    """Write ``result.json`` and drop the empty ``checkpoints/`` folder of non-training commands
    (rank 0; the other ranks wait for it, so the folder is complete when any rank returns)."""
    if dist.is_main():
        (run_dir / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        ck = run_dir / "checkpoints"
        if ck.is_dir() and not any(ck.iterdir()):
            ck.rmdir()
    dist.barrier()


def labelled_splits(cfg: Config) -> tuple[FileIndex, FileIndex]:
    """The labelled train and val (or test) splits, with val labels mapped onto train's classes."""
    train = resolve_eval_split(cfg.data, "train")
    val = resolve_eval_split(cfg.data, "val")
    if list(val.classes) != list(train.classes):
        pos = {c: i for i, c in enumerate(train.classes)}
        missing = [c for c in val.classes if c not in pos]
        if missing:
            raise UserError(
                f"the validation split {val.root} has class {missing[0]!r}, which the training split {train.root} lacks; "
                "both need the same class folders"
            )
        remap = np.array([pos[c] for c in val.classes], dtype=np.int64)
        val = FileIndex(
            root=val.root,
            paths=val.paths,
            labels=remap[np.asarray(val.labels)],
            classes=list(train.classes),
            source=val.source,
        )
    return same_files(train, "the training split"), same_files(val, "the validation split")


def single_folder(cfg: Config) -> FileIndex:
    """The images of ``data.root`` for cluster and rankme (``builtin:NAME`` means its train split;
    a folder holding train/ and val|test/ means its train/)."""
    root = cfg.data.root
    if not root:
        raise UserError(
            "data.root is not set; pass data.root=PATH (an image folder, a file list or builtin:cifar10-mini)"
        )
    if root.startswith("builtin:") and "/" not in root:
        root = root + "/train"
    index = index_source(root, cfg.data.source)
    if len(index) == 0:
        raise UserError(f"no images found in {index.root}; check data.root")
    return same_files(index, "data.root")


def prepare_backbone(backbone: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """The backbone on ``device`` in eval mode, after the config's ``auto`` values are resolved for
    ``device`` (written into ``cfg``: the run's config.yaml records them)."""
    resolve_auto(cfg, device)
    backbone = backbone.to(device)
    if channels_last_on(cfg):
        backbone = backbone.to(memory_format=memory_format(True))
    return backbone.eval()


def with_head(backbone: nn.Module, head: Optional[nn.Module], info: CheckpointInfo, what: str) -> nn.Module:
    if head is None:
        raise UserError(
            f"{info.source} has no projection head ({info.kind} {info.description}), so {what} needs backbone features; "
            "use a pretrain checkpoint for the embedding"
        )
    return nn.Sequential(backbone, head)
