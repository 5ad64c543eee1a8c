"""Pretraining: the data pipeline, the method and its step, run by the one loop.

:func:`pretrain` builds the training file index, the two-view data pipeline (PIL workers, device
augmentation, or images held on the device), the method (:mod:`interclr_cli.methods`), its
optimizer and, on resume, restores them; :class:`PretrainTask` is the step the
:class:`~interclr_cli.training.loop.TrainLoop` runs. The method owns its networks, loss and state;
this module knows nothing about queues, banks or labels.

Exact resume rests on three facts: the sampler's order is a function of (seed, epoch), each
image's augmentation is a function of (seed, epoch, position), and every other random state
(torch, Python, NumPy, the method's generators) is in the checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config.loader import to_yaml
from ..config.schema import Config
from ..data import (
    DeviceAugment,
    EpochBatchSampler,
    ImageDataset,
    InMemoryImages,
    crop_flip_transform,
    index_source,
    loader_from_config,
    moco_v2_transform,
)
from ..data.decode import device_decoded_loader
from ..data.sources import FileIndex
from ..errors import UserError
from ..methods import Method, TrainContext, build_method
from ..runtime import dist
from ..runtime.device import autocast, memory_format, process_device
from ..runtime.progress import Reporter
from ..runtime.seed import seed_everything
from .autochoice import channels_last_on, resolve_auto
from .checkpoint import TrainingCheckpoint, list_checkpoints
from .features import extract_with_config, same_files
from .loop import Position, StepTask, TaskState, TrainLoop
from .monitor import Monitor
from .optim import build_optimizer, global_lr, resolve_batch
from .resume import load_model_state, restore_training
from .rundir import MetricsLog, file_log

log = logging.getLogger("interclr")


def resolve_train_root(root: str) -> tuple[str, Optional[Path]]:
    """``builtin:NAME`` trains on the built-in set's ``train`` split. Returns (root, folder)."""
    if not root:
        raise UserError(
            "data.root is not set; pass data.root=/path/to/images (a folder, a file list or builtin:cifar10-mini)"
        )
    if root.startswith("builtin:"):
        from ..data.builtin import resolve_builtin

        folder = Path(resolve_builtin(root.split(":", 1)[1]))
        if (folder / "train").is_dir():
            folder = folder / "train"
        return str(folder), folder
    p = Path(root).expanduser()
    return str(p), (p if p.is_dir() else None)


class _InMemoryBatches:
    """Iterates a batch sampler over :class:`InMemoryImages` like a DataLoader would."""

    def __init__(self, store: InMemoryImages, sampler):
        self.store, self.sampler = store, sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for keys in self.sampler:
            yield self.store.batch(keys)


@dataclass
class PretrainResult:
    """What a pretraining run ended with: its folder, last checkpoint, position, monitors."""

    run_dir: Path
    checkpoint: Optional[Path]
    epochs: int
    steps: int
    metrics: dict
    skipped: int


@dataclass
class Pipeline:
    """The training data: a loader of two-view batches and its sampler; ``augment`` (colour ops
    on the device) and ``store`` (images held on the device) when configured."""

    loader: object
    sampler: EpochBatchSampler
    augment: Optional[DeviceAugment]
    store: Optional[InMemoryImages]


def build_pipeline(cfg: Config, index: FileIndex, device: torch.device) -> Pipeline:
    """Two views per image: PIL in the workers (``data.augment_on=workers``), or workers that only
    crop and flip with the rest batched on the device (``device``), optionally from images
    decoded once onto the device (``data.in_memory``) or per batch there from the bytes the workers
    read (``data.decode=device``; ``data.in_memory`` takes precedence). Several ranks: an unreadable image is
    replaced by the next readable one, so every rank steps on a full batch."""
    world = dist.world_size()
    on_device = cfg.data.augment_on == "device"
    transform = crop_flip_transform(cfg.data) if on_device else moco_v2_transform(cfg.data)
    dataset = ImageDataset(index, transform, views=2, substitute=world > 1)
    sampler = EpochBatchSampler(
        len(index),
        cfg.train.batch_size,
        replacement=cfg.data.replacement,
        seed=cfg.seed,
        rank=dist.rank(),
        world_size=world,
    )
    augment = DeviceAugment(cfg.data, device, cfg.seed) if on_device else None
    if cfg.data.in_memory:  # decoded once; each step gathers its images on the device (no DataLoader)
        store = InMemoryImages(dataset, device)
        return Pipeline(_InMemoryBatches(store, sampler), sampler, augment, store)
    if cfg.data.decode == "device":  # workers read bytes; each batch is decoded and cropped on the device
        loader = device_decoded_loader(index, sampler, cfg.data, device, substitute=world > 1)
        return Pipeline(loader, sampler, augment, None)
    return Pipeline(loader_from_config(dataset, sampler, cfg.data), sampler, augment, None)


class PretrainTask(StepTask):
    """One pretraining step: the batch's two views on the device, the method's loss under the
    configured precision (through DDP when distributed), its post-step maintenance, its monitors."""

    epoch_name = "epoch"
    label = "pretrain"

    def __init__(
        self,
        cfg: Config,
        method: Method,
        ddp,
        pipeline: Pipeline,
        device: torch.device,
        ctx: TrainContext,
        monitor: Optional[Monitor],
        reporter: Reporter,
        metrics: MetricsLog,
    ):
        self.cfg, self.method, self.ddp, self.pipeline, self.device = cfg, method, ddp, pipeline, device
        self.ctx, self.monitor, self.reporter, self.metrics = ctx, monitor, reporter, metrics
        self.fmt = memory_format(channels_last_on(cfg))
        self.last_metrics: dict = {}

    def start(self) -> None:
        """Before the first step (and after a resume): the method's set-up (InterCLR: k-means,
        bank), the replica check of a distributed run, and the monitors at initialisation."""
        self.method.train()
        self.method.on_train_start(self.ctx)
        if self.ddp is not None:
            from ..runtime.ddp import check_replicas

            check_replicas(self.method)
        m = self.cfg.monitor
        if self.monitor is not None and m.at_start and not self.ctx.resumed and m.every > 0:
            self.last_metrics = self.monitor.run(self.method, self.reporter)
            self.metrics.write({"type": "monitor", "epoch": 0, "step": 0, **self.last_metrics})
            self.reporter.print("initial monitors: " + format_metrics(self.last_metrics))

    def on_epoch_start(self, epoch: int) -> None:
        self.method.on_epoch_start(epoch, self.ctx)

    def _views(self, batch: dict, pos: Position) -> dict:
        batch = {
            k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
        }
        augment, rank = self.pipeline.augment, dist.rank()
        for v, key in enumerate(("view1", "view2")):
            if "images" in batch:  # whole images on the device (data.in_memory, data.decode=device)
                batch[key] = augment.from_images(
                    batch["images"], epoch=pos.epoch, step_in_epoch=pos.step_in_epoch, rank=rank, view=v
                )
            elif augment is not None:
                batch[key] = augment(batch[key], epoch=pos.epoch, step_in_epoch=pos.step_in_epoch, rank=rank, view=v)
            batch[key] = batch[key].to(memory_format=self.fmt)
        return batch

    def forward(self, batch: dict, pos: Position):
        batch = self._views(batch, pos)
        with autocast(self.device, self.cfg.train.precision):
            return (self.ddp or self.method).training_step(batch, pos.step, pos.epoch)

    def parameters(self):
        return self.method.trainable_parameters()

    def after_optimizer_step(self, step: int) -> None:
        self.method.after_optimizer_step(step)

    def histograms(self) -> dict[str, torch.Tensor]:
        """InterCLR's cluster sizes [K] (members per pseudo-label), for TensorBoard and the epoch record."""
        from ..memory import OnlineLabels

        labels = getattr(self.method, "labels", None)
        return {"cluster_size": labels.counts} if isinstance(labels, OnlineLabels) else {}

    def end_epoch(self, record: dict, last: bool) -> tuple[dict, str]:
        every = self.cfg.monitor.every
        if self.monitor is None or every <= 0 or not (record["epoch"] % every == 0 or last):
            return {}, ""
        self._sync_buffers()
        self.last_metrics = self.monitor.run(self.method, self.reporter)
        return dict(self.last_metrics), format_metrics(self.last_metrics)

    def _sync_buffers(self) -> None:
        if self.ddp is not None:
            self.ddp.sync_buffers()  # BN running statistics: rank 0's on every rank

    def state(self) -> TaskState:
        self._sync_buffers()
        return TaskState(
            model=self.method.state_dict(),
            extra=self.method.extra_state(),
            kind="pretrain",
            info={"metrics": self.last_metrics},
        )


def format_metrics(metrics: dict) -> str:
    """``name value`` pairs with two decimals, for summary lines."""
    return "  ".join(f"{k} {v:.2f}" for k, v in metrics.items())


class _RunFolder:
    """The run folder of a new run is created only once the config, device and data are known to
    be good (bad input leaves nothing behind): the file index is written to a temporary folder
    first and moved in by :meth:`create`."""

    def __init__(self, run_dir: Path, prepare: Optional[Callable[[], None]]):
        self.run_dir, self.prepare = run_dir, prepare
        self.tmp_cache: Optional[Path] = None

    def index(self, cfg: Config) -> tuple[FileIndex, Optional[Path]]:
        """The training file index (the same on every rank, checked) and its folder."""
        root, folder = resolve_train_root(cfg.data.root)
        cache = self.run_dir / "file_index.txt"
        if self.prepare is not None:  # a new run: the other ranks scan too, and write nothing
            if dist.is_main():
                self.tmp_cache = Path(tempfile.mkdtemp(prefix="interclr-index-")) / "file_index.txt"
            index = index_source(root, cfg.data.source, cache_path=self.tmp_cache)
        else:  # rank 0 scans and writes the cache; the others read it (and never write)
            index = dist.main_first(
                lambda main: index_source(root, cfg.data.source, cache_path=cache if main or cache.is_file() else None)
            )
        return same_files(index, "the training file list"), folder

    def create(self) -> None:
        if self.prepare is None:
            return
        try:
            self.prepare()
            if dist.is_main() and self.tmp_cache is not None and self.tmp_cache.is_file():
                shutil.move(str(self.tmp_cache), self.run_dir / "file_index.txt")
        finally:
            if self.tmp_cache is not None:
                shutil.rmtree(self.tmp_cache.parent, ignore_errors=True)
            self.prepare = None


def _build_method(cfg: Config, n: int, device: torch.device) -> Method:
    method = build_method(cfg, n).to(device)
    if channels_last_on(cfg):
        method = method.to(memory_format=memory_format(True))
    if dist.is_dist():
        from ..runtime.ddp import convert_sync_bn

        method = convert_sync_bn(method, sync_bn=cfg.model.sync_bn, key_bn=cfg.method.key_bn, device=device)
    return method


def _context(
    cfg: Config, index: FileIndex, steps_per_epoch: int, resumed: bool, device, ddp, reporter: Reporter
) -> TrainContext:
    """What the method may use outside its step: feature extraction over the training set."""

    def run_extract(fn):
        if ddp is not None:
            ddp.sync_buffers()  # eval-mode BN statistics: the same on every rank
        (feats,), _ = extract_with_config(fn, index, cfg, device, reporter, "extracting features")
        return feats

    return TrainContext(
        device=device,
        num_samples=len(index),
        steps_per_epoch=steps_per_epoch,
        resumed=resumed,
        extract=run_extract,
        log=reporter.print,
    )


def pretrain(
    cfg: Config,
    run_dir: Path,
    *,
    resume: Optional[TrainingCheckpoint] = None,
    show_progress: bool = True,
    prepare: Optional[Callable[[], None]] = None,
) -> PretrainResult:
    """Pretrain ``cfg.method`` on ``cfg.data.root`` into ``run_dir`` (continuing ``resume``).

    ``prepare`` creates the run folder of a new run; it is called once the config, the device and
    the data are validated. Every rank calls this; rank 0 alone writes files.
    """
    run_dir = Path(dist.broadcast_object(str(run_dir)))  # rank 0's (a default name holds a timestamp)
    device = process_device(cfg.device)
    seed_everything(cfg.seed)
    folder_ = _RunFolder(run_dir, prepare)
    index, folder = folder_.index(cfg)
    resolve_auto(cfg, device, index.paths)  # precision, memory format, data path: recorded in config.yaml
    world = dist.world_size()
    resolve_batch(cfg, world)
    if len(index) < cfg.train.batch_size * world:
        raise UserError(
            f"the data set has {len(index)} images, fewer than one global batch ({cfg.train.batch_size * world}); lower train.batch_size"
        )
    pipeline = build_pipeline(cfg, index, device)
    method = _build_method(cfg, len(index), device)
    _, base_lr = global_lr(cfg.optim, cfg.train.batch_size, world)
    optimizer = build_optimizer(cfg.optim, [{"params": method.trainable_parameters()}], base_lr)
    ddp = None
    if dist.is_dist():
        from ..runtime.ddp import wrap_ddp

        ddp = wrap_ddp(method, device)
    pos = Position()
    if resume is not None:
        load_model_state(method, resume.section("model"), resume)
        method.load_extra_state(resume.section("method"))
        pos = restore_training(resume, optimizer)
    if cfg.train.compile:
        method.compile_networks()
    folder_.create()
    reporter = Reporter(enabled=show_progress)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    ctx = _context(cfg, index, pipeline.sampler.steps_per_epoch, resume is not None, device, ddp, reporter)
    monitor = None
    if cfg.monitor.rankme or cfg.monitor.knn:
        monitor = Monitor(cfg, index, folder, device, run_dir if dist.is_main() else None)
    if resume is None and dist.is_main():
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    task = PretrainTask(cfg, method, ddp, pipeline, device, ctx, monitor, reporter, metrics)
    loop = TrainLoop(
        cfg,
        task,
        optimizer,
        pipeline.loader,
        pipeline.sampler,
        device=device,
        metrics=metrics,
        reporter=reporter,
        ckpt_dir=run_dir / "checkpoints",
    )
    last = list_checkpoints(run_dir / "checkpoints")[-1:] if resume is not None else []
    with file_log(run_dir / "train.log"), reporter:
        task.start()
        res = loop.run(pos, last[0] if last else None)
    return PretrainResult(
        run_dir, res.checkpoint, res.position.epoch, res.position.step, task.last_metrics, res.skipped
    )
