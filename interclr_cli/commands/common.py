"""What every downstream command shares: config resolution, run folders, splits, extraction."""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from ..config.loader import apply_overrides, config_from_mapping, load_preset_mapping, to_yaml, validate
from ..config.schema import Config
from ..data import EpochBatchSampler, ImageDataset, eval_transform, index_source, linear_train_transform, loader_from_config, resolve_eval_split
from ..data.sources import FileIndex
from ..errors import UserError
from ..runtime import dist
from ..runtime.device import memory_format, select_device
from ..training.features import extract
from ..training.optim import scaled_lr
from ..training.rundir import check_run_dir, default_run_dir, prepare_run_dir
from .loading import describe

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


def is_small(info: dict) -> bool:
    """Small-image settings: a small stem, or a training image size of at most 64 px."""
    size = info.get("image_size")
    return bool(info["small_stem"]) or (size is not None and int(size) <= SMALL_IMAGE)


def default_preset(command: str, info: dict) -> str:
    small, large = DEFAULT_PRESETS[command]
    return small if is_small(info) else large


def resolve_config(command: str, preset: Optional[str], overrides: list[str], info: dict) -> Config:
    """The preset (or the command's default for this checkpoint) with overrides applied.

    The architecture comes from the checkpoint: ``model.arch``/``model.small_stem`` set by the
    preset or an override must agree with it (the error names both).
    """
    name = preset or default_preset(command, info)
    mapping = apply_overrides(load_preset_mapping(name), overrides)
    cfg = config_from_mapping(mapping)
    given = mapping.get("model") or {}
    for key in ("arch", "small_stem"):
        if key in given and getattr(cfg.model, key) != info[key]:
            raise UserError(
                f"the checkpoint {info['source']} is a {describe(info)} but the config sets model.{key}={getattr(cfg.model, key)} "
                f"(from --preset {name} or an override); drop model.{key}: the architecture always comes from the checkpoint"
            )
    cfg.model.arch, cfg.model.small_stem = info["arch"], info["small_stem"]
    if info.get("embed_dim"):
        cfg.model.embed_dim = int(info["embed_dim"])
    if info.get("head_hidden"):
        cfg.model.head_hidden = int(info["head_hidden"])
    if not cfg.name:
        cfg.name = Path(name).stem
    validate(cfg)
    if not preset:
        log.info("no --preset given: using %s (the default of %s for a %s%s)", name, command, describe(info),
                 f" trained at {info['image_size']} px" if info.get("image_size") else "")
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


def rank_device(cfg: Config) -> torch.device:
    """``device`` from the config; under a launcher with GPUs every rank uses its own GPU
    (``LOCAL_RANK``, set up by :func:`~interclr_cli.runtime.launch.init_distributed`), as in pretraining."""
    device = select_device(cfg.device)
    if dist.is_dist() and device.type == "cuda" and device.index not in (None, torch.cuda.current_device()):
        log.warning(f"device={cfg.device} ignored under a distributed launch: rank {dist.rank()} uses its own GPU (LOCAL_RANK)")
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def global_lr(cfg: Config) -> tuple[int, float]:
    """(global batch, base learning rate): ``train.batch_size`` is per process, and ``optim.lr``
    is scaled with the global batch by :func:`~interclr_cli.training.optim.scaled_lr` (the rule of
    pretraining: ``lr x global_batch / optim.reference_batch``, unscaled when that is 0)."""
    world = dist.world_size()
    batch = cfg.train.batch_size * world
    lr = scaled_lr(cfg.optim, batch)
    if world > 1 or cfg.optim.reference_batch > 0:
        log.info(f"global batch {batch} ({world} x {cfg.train.batch_size}); lr {lr:.4g}"
                 + (f" = {cfg.optim.lr:g} x {batch}/{cfg.optim.reference_batch} (linear scaling rule)"
                    if cfg.optim.reference_batch > 0 else " (optim.reference_batch=0: not scaled)"))
    return batch, lr


def supervised_loader(index: FileIndex, cfg: Config, *, drop_last: bool):
    """(loader, sampler) of labelled training images with the linear-eval/finetune augmentation,
    each process on its slice of every global batch. Under a distributed launch an unreadable
    image is replaced by the next readable one, so no process is left without a batch to step on."""
    world = dist.world_size()
    dataset = ImageDataset(index, linear_train_transform(cfg.data), views=1, substitute=world > 1)
    sampler = EpochBatchSampler(len(index), cfg.train.batch_size, replacement=False, seed=cfg.seed,
                                rank=dist.rank(), world_size=world, drop_last=drop_last)
    return loader_from_config(dataset, sampler, cfg.data), sampler


def epoch_totals(loss_sum: torch.Tensor, seen: int, skipped: int) -> tuple[float, int, int]:
    """(mean training loss, images, skipped images) of an epoch over every rank's share (one all-reduce)."""
    t = torch.stack([loss_sum.detach().double(), loss_sum.new_tensor(float(seen), dtype=torch.float64),
                     loss_sum.new_tensor(float(skipped), dtype=torch.float64)])
    total, seen_all, skipped_all = dist.all_reduce_sum(t).tolist()
    return total / max(seen_all, 1), int(seen_all), int(skipped_all)


def open_run(command: str, cfg: Config, out: Optional[str], force: bool, extra: Optional[dict] = None) -> Path:
    """Create ``--out`` or ``runs/<command>-<timestamp>`` (pretrain's refusal and --force rules)
    and write ``config.yaml`` (the run marker) and ``run.json`` (the command and its inputs).
    Distributed: rank 0 names, creates and writes the folder; every rank returns its path."""
    single_process(command)
    run_dir = Path(dist.broadcast_object(str(Path(out) if out else default_run_dir(command))))
    prepare_run_dir(run_dir, resume=False, force=force)
    if dist.is_main():
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        (run_dir / "run.json").write_text(json.dumps({"command": command, **(extra or {})}, indent=2, default=str) + "\n")
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


def same_files(index: FileIndex, what: str) -> FileIndex:
    """Distributed: raise on every rank unless every rank lists the same files for ``what`` (the
    sharded extraction and the sampler index into one list)."""
    if dist.is_dist():
        digest = zlib.crc32("\n".join(index.paths).encode("utf-8", "surrogateescape"))
        dist.check_same((len(index), digest), f"the file list of {what} (count, crc32)")
    return index


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
        val = FileIndex(root=val.root, paths=val.paths, labels=remap[np.asarray(val.labels)], classes=list(train.classes), source=val.source)
    return same_files(train, "the training split"), same_files(val, "the validation split")


def single_folder(cfg: Config) -> FileIndex:
    """The images of ``data.root`` for cluster and rankme (``builtin:NAME`` means its train split;
    a folder holding train/ and val|test/ means its train/)."""
    root = cfg.data.root
    if not root:
        raise UserError("data.root is not set; pass data.root=PATH (an image folder, a file list or builtin:cifar10-mini)")
    if root.startswith("builtin:") and "/" not in root:
        root = root + "/train"
    index = index_source(root, cfg.data.source)
    if len(index) == 0:
        raise UserError(f"no images found in {index.root}; check data.root")
    return same_files(index, "data.root")


def prepare_backbone(backbone: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    backbone = backbone.to(device)
    if cfg.train.channels_last:
        backbone = backbone.to(memory_format=memory_format(True))
    return backbone.eval()


def run_extract(fns: Callable, index: FileIndex, cfg: Config, device: torch.device, reporter, description: str,
                transform=None, aug_seed: Optional[int] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`~interclr_cli.training.features.extract` with the config's batch size, workers and
    precision: sharded across the ranks of a distributed run, every rank gets every row in order."""
    return extract(fns, index, transform if transform is not None else eval_transform(cfg.data), device=device,
                   batch_size=cfg.eval.feature_batch_size, num_workers=cfg.data.num_workers,
                   precision=cfg.train.precision, channels_last=cfg.train.channels_last, reporter=reporter,
                   description=description, aug_seed=aug_seed)


def with_head(backbone: nn.Module, head: Optional[nn.Module], info: dict, what: str) -> nn.Module:
    if head is None:
        raise UserError(
            f"{info['source']} has no projection head ({info['kind']} {describe(info)}), so {what} needs backbone features; "
            "use a pretrain checkpoint for the embedding"
        )
    return nn.Sequential(backbone, head)
