"""The one training loop for every self-supervised method.

The loop owns the device, precision, optimizer, schedule, checkpoints, metrics and progress; the
method (see :mod:`interclr_cli.methods.base`) owns its networks, loss and state. Exact resume
rests on three facts: the sampler's order is a function of (seed, epoch), each image's
augmentation is a function of (seed, epoch, position), and every other random state (torch,
Python, NumPy, the method's generators) is in the checkpoint.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import yaml

from ..config.loader import to_mapping, to_yaml
from ..config.schema import Config
from ..data import DeviceAugment, EpochBatchSampler, InMemoryImages, ImageDataset, crop_flip_transform, eval_transform, index_source, loader_from_config, moco_v2_transform
from ..data.sources import FileIndex
from ..errors import UserError, WorkError
from ..methods import TrainContext, build_method
from ..runtime import dist
from .checkpoint import TrainingCheckpoint, check_compatible, checkpoint_name, list_checkpoints, load_optimizer, prune_checkpoints, restore_rng, save_training_checkpoint
from ..runtime.device import autocast, memory_format, select_device
from .features import extract, rng_neutral_iter
from .monitor import Monitor
from .optim import build_optimizer, lr_factor, scaled_lr, set_lr
from ..runtime.progress import Reporter
from .rundir import MetricsLog, attach_file_log, detach_log

log = logging.getLogger("interclr")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_train_root(root: str) -> tuple[str, Optional[Path]]:
    """``builtin:NAME`` trains on the built-in set's ``train`` split. Returns (root, folder)."""
    if not root:
        raise UserError("data.root is not set; pass data.root=/path/to/images (a folder, a file list or builtin:cifar10-mini)")
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
class RunResult:
    run_dir: Path
    checkpoint: Optional[Path]
    epochs: int
    steps: int
    metrics: dict
    skipped: int


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, *, resume_from: Optional[Path] = None, show_progress: bool = True,
                 prepare: Optional[Callable[[], None]] = None):
        self.cfg = cfg
        self.run_dir = Path(dist.broadcast_object(str(run_dir)))  # rank 0's (a default name holds a timestamp)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.resume_from = resume_from
        self.prepare = prepare
        self._tmp_cache: Optional[Path] = None
        self.reporter = Reporter(enabled=show_progress)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")

    # -- set-up ---------------------------------------------------------------------------------
    def _data(self) -> tuple[FileIndex, Optional[Path]]:
        root, folder = resolve_train_root(self.cfg.data.root)
        cache = self.run_dir / "file_index.txt"
        if self.prepare is not None:
            # a new run: the run folder does not exist yet, so that bad data leaves nothing behind;
            # the index cache is written to a temporary folder and moved in by _create_run_dir
            if dist.is_main():  # the other ranks scan too, and write nothing
                self._tmp_cache = Path(tempfile.mkdtemp(prefix="interclr-index-")) / "file_index.txt"
            index = index_source(root, self.cfg.data.source, cache_path=self._tmp_cache)
        else:
            # rank 0 scans and writes the cache; the others read it (and never write)
            index = dist.main_first(lambda main: index_source(root, self.cfg.data.source,
                                                              cache_path=cache if main or cache.is_file() else None))
        if dist.is_dist():
            digest = zlib.crc32("\n".join(index.paths).encode("utf-8", "surrogateescape"))
            dist.check_same((len(index), digest), "the training file list (count, crc32)")
        return index, folder

    def _ctx(self, index: FileIndex, steps_per_epoch: int, resumed: bool) -> TrainContext:
        cfg, device = self.cfg, self.device
        transform = eval_transform(cfg.data)

        def run_extract(fn):
            if getattr(self, "_ddp", None) is not None:
                self._ddp.sync_buffers()  # eval-mode BN statistics: the same on every rank
            (feats,), _ = extract(fn, index, transform, device=device, batch_size=cfg.eval.feature_batch_size,
                                  num_workers=cfg.data.num_workers, precision=cfg.train.precision,
                                  channels_last=cfg.train.channels_last, reporter=self.reporter,
                                  description="extracting features")
            return feats

        return TrainContext(device=device, num_samples=len(index), steps_per_epoch=steps_per_epoch,
                            resumed=resumed, extract=run_extract, log=lambda s: self.reporter.print(s))

    def _create_run_dir(self) -> None:
        """Create the run folder once the config, device and data are known to be good."""
        if self.prepare is None:
            return
        try:
            self.prepare()
            if dist.is_main() and self._tmp_cache is not None and self._tmp_cache.is_file():
                shutil.move(str(self._tmp_cache), self.run_dir / "file_index.txt")
        finally:
            if self._tmp_cache is not None:
                shutil.rmtree(self._tmp_cache.parent, ignore_errors=True)
            self.prepare = None

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> RunResult:
        cfg = self.cfg
        self.device = device = select_device(cfg.device)
        if dist.is_dist() and device.type == "cuda" and device.index not in (None, torch.cuda.current_device()):
            log.warning(f"device={cfg.device} ignored under a distributed launch: rank {dist.rank()} uses its own GPU (LOCAL_RANK)")
            self.device = device = torch.device("cuda", torch.cuda.current_device())
        seed_everything(cfg.seed)
        index, folder = self._data()
        n = len(index)
        world = dist.world_size()
        if n < cfg.train.batch_size * world:
            raise UserError(f"the data set has {n} images, fewer than one global batch ({cfg.train.batch_size * world}); lower train.batch_size")
        # several ranks: every rank must step on a full batch, so unreadable images are replaced
        # data.augment_on=device: the workers only crop and flip; the rest runs batched on the device
        on_device = cfg.data.augment_on == "device"
        transform = crop_flip_transform(cfg.data) if on_device else moco_v2_transform(cfg.data)
        dataset = ImageDataset(index, transform, views=2, substitute=world > 1)
        sampler = EpochBatchSampler(n, cfg.train.batch_size, replacement=cfg.data.replacement, seed=cfg.seed,
                                    rank=dist.rank(), world_size=world)
        steps_per_epoch = sampler.steps_per_epoch
        total_steps = steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            total_steps = min(total_steps, cfg.train.max_steps)
        augment = DeviceAugment(cfg.data, device, cfg.seed) if on_device else None
        if cfg.data.in_memory:
            # decoded once; each step gathers its images on the device (no DataLoader)
            store = InMemoryImages(dataset, device)
            loader = _InMemoryBatches(store, sampler)
        else:
            store, loader = None, loader_from_config(dataset, sampler, cfg.data)

        method = build_method(cfg, n).to(device)
        fmt = memory_format(cfg.train.channels_last)
        if cfg.train.channels_last:
            method = method.to(memory_format=fmt)
        if dist.is_dist():
            from ..runtime.ddp import convert_sync_bn

            method = convert_sync_bn(method, sync_bn=cfg.model.sync_bn, key_bn=cfg.method.key_bn, device=device)
        base_lr = scaled_lr(cfg.optim, cfg.train.batch_size * world)
        if world > 1 or cfg.optim.reference_batch > 0:
            log.info(f"global batch {cfg.train.batch_size * world} ({world} x {cfg.train.batch_size}); lr {base_lr:.4g}"
                     + (f" = {cfg.optim.lr:g} x {cfg.train.batch_size * world}/{cfg.optim.reference_batch} (linear scaling rule)"
                        if cfg.optim.reference_batch > 0 else " (optim.reference_batch=0: not scaled)"))
        optimizer = build_optimizer(cfg.optim, [{"params": method.trainable_parameters()}], base_lr)
        ddp_model = None
        if dist.is_dist():
            from ..runtime.ddp import wrap_ddp

            ddp_model = self._ddp = wrap_ddp(method, device)

        epoch, step, step_in_epoch = 0, 0, 0
        resumed = self.resume_from is not None
        if resumed:
            ck = TrainingCheckpoint(self.resume_from)
            dist.check_same((ck.path.name, ck.step), "the checkpoint to resume from")
            check_compatible(ck.config, to_mapping(cfg), ck.path)
            missing, unexpected = method.load_state_dict(ck.section("model"), strict=False)
            if missing or unexpected:
                raise UserError(f"checkpoint {ck.path.name} does not match the model ({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. {(missing or unexpected)[0]}); resume with the run's own config")
            method.load_extra_state(ck.section("method"))
            load_optimizer(optimizer, ck.tensors, ck.optimizer_meta)
            restore_rng(ck.tensors, ck.rng_meta)
            epoch, step, step_in_epoch = ck.epoch, ck.step, ck.step_in_epoch
            if step_in_epoch >= steps_per_epoch:
                epoch, step_in_epoch = epoch + 1, 0
            log.info(f"resumed from {ck.path} at epoch {epoch}, step {step}")
        if cfg.train.compile:
            method.compile_networks()

        self._create_run_dir()
        ctx = self._ctx(index, steps_per_epoch, resumed)
        monitor = Monitor(cfg, index, folder, device, self.run_dir if dist.is_main() else None) if (cfg.monitor.rankme or cfg.monitor.knn) else None
        last_ckpt: Optional[Path] = None
        last_metrics: dict = {}
        total_skipped = 0
        done = step >= total_steps

        def save(ep: int, st: int, sie: int) -> Path:
            path = self.ckpt_dir / checkpoint_name(ep, st)
            if ddp_model is not None:
                ddp_model.sync_buffers()  # BN running statistics: the same on every rank
            if dist.is_main():
                save_training_checkpoint(path, model_state=method.state_dict(), extra_state=method.extra_state(),
                                         optimizer=optimizer, config=to_mapping(cfg), epoch=ep, step=st,
                                         step_in_epoch=sie, info={"metrics": last_metrics})
                prune_checkpoints(self.ckpt_dir, cfg.train.keep_last)
            dist.barrier()
            return path

        if not resumed and dist.is_main():
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        handler = attach_file_log(self.run_dir / "train.log")
        try:
            with self.reporter:
                method.train()
                method.on_train_start(ctx)
                if ddp_model is not None:
                    from ..runtime.ddp import check_replicas

                    check_replicas(method)
                if monitor is not None and cfg.monitor.at_start and not resumed and cfg.monitor.every > 0:
                    last_metrics = {f"{k}": v for k, v in monitor.run(method, self.reporter).items()}
                    self.metrics.write({"type": "monitor", "epoch": 0, "step": 0, **last_metrics})
                    self.reporter.print("initial monitors: " + _fmt(last_metrics))
                if resumed and list_checkpoints(self.ckpt_dir):
                    last_ckpt = list_checkpoints(self.ckpt_dir)[-1]
                while epoch < cfg.train.epochs and not done:
                    sampler.set_epoch(epoch, step_in_epoch)
                    method.on_epoch_start(epoch, ctx)
                    task = self.reporter.task(f"epoch {epoch + 1}/{cfg.train.epochs}", total=steps_per_epoch)
                    self.reporter.update(task, advance=step_in_epoch)
                    loss_sum = torch.zeros((), device=device)
                    loss_n, skipped, images = 0, 0, 0
                    t0 = time.perf_counter()
                    tlog, ilog = t0, 0
                    log_acc: dict[str, torch.Tensor] = {}
                    for batch in rng_neutral_iter(loader):
                        skipped += int(batch.get("skipped", 0))
                        bsz = batch["index"].numel()
                        if bsz == 0:
                            step_in_epoch += 1
                            continue
                        batch = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                        for v, key in enumerate(("view1", "view2")):
                            if store is not None:
                                batch[key] = augment.from_images(batch["images"], epoch=epoch, step_in_epoch=step_in_epoch, rank=dist.rank(), view=v)
                            elif augment is not None:
                                batch[key] = augment(batch[key], epoch=epoch, step_in_epoch=step_in_epoch, rank=dist.rank(), view=v)
                            batch[key] = batch[key].to(memory_format=fmt)
                        lr = set_lr(optimizer, lr_factor(cfg.optim, step, steps_per_epoch, steps_per_epoch * cfg.train.epochs))
                        with autocast(device, cfg.train.precision):
                            loss, logs = (ddp_model or method).training_step(batch, step, epoch)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        if ddp_model is not None:
                            ddp_model.sync_gradients()
                        if cfg.optim.grad_clip > 0:
                            torch.nn.utils.clip_grad_norm_(method.trainable_parameters(), cfg.optim.grad_clip)
                        optimizer.step()
                        method.after_optimizer_step(step)
                        step += 1
                        step_in_epoch += 1
                        loss_sum += loss.detach().float()
                        loss_n += 1
                        images += bsz * world
                        ilog += bsz * world
                        for k, v in logs.items():
                            log_acc[k] = v.detach().float()
                        if step % cfg.train.log_every == 0 or step_in_epoch == steps_per_epoch or step >= total_steps:
                            loss_v = dist.all_reduce_mean(loss.detach().float()).item()  # the one sync per logging interval
                            if not math.isfinite(loss_v):
                                raise WorkError(f"loss became {loss_v} at step {step} (epoch {epoch + 1}); the last good checkpoint is kept"
                                                f"{' at ' + str(last_ckpt) if last_ckpt else ''}; lower optim.lr or enable optim.grad_clip")
                            now = time.perf_counter()
                            rate = ilog / max(now - tlog, 1e-9)
                            tlog, ilog = now, 0
                            rec = {"type": "step", "epoch": epoch + 1, "step": step, "loss": loss_v, "lr": lr, "img_per_s": rate}
                            rec.update({k: float(v.item()) for k, v in log_acc.items()})
                            self.metrics.write(rec)
                            self.reporter.update(task, info=f"loss {loss_v:.4f} lr {lr:.4g} {rate:.1f} img/s")
                        self.reporter.update(task, advance=1)
                        if cfg.train.ckpt_every_steps and step % cfg.train.ckpt_every_steps == 0 and step_in_epoch < steps_per_epoch:
                            last_ckpt = save(epoch, step, step_in_epoch)
                        if step >= total_steps:
                            done = True
                            break
                    self.reporter.finish(task)
                    epoch_loss = dist.all_reduce_mean(loss_sum / max(loss_n, 1)).item()
                    if not math.isfinite(epoch_loss):
                        raise WorkError(f"loss became {epoch_loss} in epoch {epoch + 1}; the last good checkpoint is kept; lower optim.lr or enable optim.grad_clip")
                    finished_epoch = step_in_epoch >= steps_per_epoch
                    ep_done = epoch + 1
                    elapsed = time.perf_counter() - t0
                    skipped = int(dist.all_reduce_sum(torch.tensor(skipped)).item())  # every rank's share
                    total_skipped += skipped
                    rec = {"type": "epoch", "epoch": ep_done, "step": step, "loss": epoch_loss, "lr": optimizer.param_groups[0]["lr"],
                           "img_per_s": images / max(elapsed, 1e-9), "seconds": elapsed, "skipped": skipped}
                    last_is_final = done or ep_done >= cfg.train.epochs
                    if monitor is not None and cfg.monitor.every > 0 and (ep_done % cfg.monitor.every == 0 or last_is_final):
                        if ddp_model is not None:
                            ddp_model.sync_buffers()
                        mon = monitor.run(method, self.reporter)
                        last_metrics = mon
                        rec.update(mon)
                    self.metrics.write(rec)
                    self.reporter.print(
                        f"epoch {ep_done}/{cfg.train.epochs}  step {step}  loss {epoch_loss:.4f}  "
                        f"{rec['img_per_s']:.1f} img/s  {elapsed:.1f}s  skipped {skipped}"
                        + (f"  {_fmt(last_metrics)}" if any(k in rec for k in last_metrics) else "")
                    )
                    if finished_epoch:
                        epoch, step_in_epoch = epoch + 1, 0
                        if epoch % cfg.train.ckpt_every == 0 or epoch >= cfg.train.epochs or done:
                            last_ckpt = save(epoch, step, 0)
                    elif done:
                        last_ckpt = save(epoch, step, step_in_epoch)
        finally:
            detach_log(handler)
        return RunResult(self.run_dir, last_ckpt, epoch, step, last_metrics, total_skipped)


def _fmt(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.2f}" for k, v in metrics.items())


def latest_checkpoint(run_dir: Path) -> Path:
    ckpts = list_checkpoints(Path(run_dir) / "checkpoints")
    if not ckpts:
        raise UserError(f"no checkpoint to resume in {run_dir}/checkpoints; start the run again with --force")
    return ckpts[-1]


def load_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.yaml"
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read {path} ({e}); is this an interclr run folder?") from None
