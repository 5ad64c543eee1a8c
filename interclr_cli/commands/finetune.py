"""`interclr finetune`: the whole network plus a new linear head, on all or a fraction of the labels.

The semi-supervised protocol of SimCLR (Chen et al., ICML 2020, Appendix B.5) as InterCLR reports
it: the backbone at ``optim.lr``, the new head at ``optim.lr * optim.head_lr_mult``, SGD with a
step schedule. The labelled subset is a class-stratified seeded fraction
(:func:`~interclr_cli.eval.subsets.stratified_subset`) or a list of file names
(:func:`~interclr_cli.eval.subsets.subset_from_list`, e.g. the canonical ImageNet 1%/10% lists);
it is written to ``label_subset.txt`` in the run folder (a file list usable as ``data.train``).

Checkpoints, resume and metrics work as in pretraining: a checkpoint (``kind=finetune``, tensors
``model.backbone.*`` and ``model.fc.*``) every ``train.ckpt_every`` epochs, and a killed run
continues bit-identically with ``--resume`` (the sampler and the augmentations are functions of
the seed, epoch and position; every other random state is in the checkpoint).

Distributed (torchrun/srun): as pretraining. ``train.batch_size`` is per process, the learning
rates follow the global batch (:func:`~interclr_cli.commands.common.global_lr`), every
process trains on its slice of each global batch under DistributedDataParallel, ``model.sync_bn``
synchronises the backbone's BatchNorm over the global batch (else BatchNorm is per process and
the running statistics are rank 0's), validation is extracted sharded, rank 0 alone writes the
run folder, and on ``--resume`` every process loads the same checkpoint (checked).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config.loader import apply_overrides, config_from_mapping, to_mapping, validate
from ..config.schema import Config
from ..data.sources import FileIndex
from ..errors import UserError, WorkError
from ..eval.subsets import stratified_subset, subset_from_list
from ..models import FEATURE_DIMS, build_backbone
from ..training.checkpoint import TrainingCheckpoint, check_compatible, checkpoint_name, list_checkpoints, load_optimizer, prune_checkpoints, restore_rng, save_training_checkpoint
from ..runtime import dist
from ..runtime.ddp import convert_sync_bn, ddp_module, sync_bn_buffers
from ..runtime.device import autocast, memory_format
from ..training.features import subset_index
from ..training.optim import build_optimizer, lr_factor, set_lr
from .pretrain import resolve_resume
from ..runtime.progress import Reporter
from ..training.rundir import MetricsLog, attach_file_log, detach_log, prepare_run_dir
from ..training.pretraining import load_run_config, seed_everything
from .common import close_run, epoch_totals, global_lr, labelled_splits, open_run, rank_device, refuse_early, resolve_config, run_extract, supervised_loader
from .linear_eval import new_linear
from .loading import describe, load_backbone

log = logging.getLogger("interclr")

SUBSET_FILE = "label_subset.txt"


class FinetuneNet(nn.Module):
    """``fc(backbone(x))``; state dict keys ``backbone.*`` (torchvision names) and ``fc.*``."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int, seed: int):
        super().__init__()
        self.backbone = backbone
        self.fc = new_linear(dim, num_classes, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


def choose_subset(train: FileIndex, cfg: Config) -> tuple[np.ndarray, str]:
    """Positions of the labelled subset in ``train`` and a description of how it was chosen."""
    d = cfg.data
    if d.label_list:
        if d.label_fraction != 1.0:
            log.info("data.label_list is set, so data.label_fraction=%g is ignored", d.label_fraction)
        return subset_from_list(train.paths, Path(d.label_list)), f"list {d.label_list}"
    if d.label_fraction < 1.0:
        return stratified_subset(np.asarray(train.labels), d.label_fraction, cfg.seed), f"stratified {d.label_fraction:g} (seed {cfg.seed})"
    return np.arange(len(train), dtype=np.int64), "all labels"


def write_subset(path: Path, index: FileIndex, how: str) -> None:
    """A file list (``path label`` per line, ``#`` comments) of the labelled subset."""
    lines = [f"# interclr finetune labelled subset: {how}; {len(index)} images, {len(index.classes)} classes",
             f"# classes: {' '.join(index.classes)}"]
    lines += [f"{p} {int(l)}" for p, l in zip(index.paths, np.asarray(index.labels).tolist())]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def read_subset_paths(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            out.append(line.rsplit(" ", 1)[0])
    return out


def _evaluate(model: nn.Module, val: FileIndex, cfg: Config, device, reporter) -> dict:
    """Validation loss and top-1/top-5 of ``model`` (not its DDP wrapper: the extraction is
    sharded, so ranks may run different numbers of batches), with rank 0's BN statistics."""
    sync_bn_buffers(model)
    was = model.training
    model.eval()
    try:
        (logits,), y = run_extract(model, val, cfg, device, reporter, "val")
    finally:
        model.train(was)
    y = y.to(device)
    loss = F.cross_entropy(logits, y)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == y[:, None]
    vals = torch.stack([loss, hit[:, 0].float().mean(), hit.any(dim=1).float().mean()]).tolist()
    return {"val_loss": vals[0], "top1": 100.0 * vals[1], "top5": 100.0 * vals[2]}


def run_finetune(checkpoint: Optional[str], preset: Optional[str], overrides: list[str], *, out: Optional[str],
                 resume: Optional[str] = None, force: bool = False, show_progress: bool = True) -> dict:
    ck = None
    if resume is not None:
        if force:
            raise UserError("--resume and --force contradict each other; use one")
        run_dir, ckpt_path = resolve_resume(resume, out)
        ck = TrainingCheckpoint(ckpt_path)
        dist.check_same((ck.path.name, ck.step), "the checkpoint to resume from")
        if ck.kind != "finetune":
            raise UserError(f"{ck.path} is a {ck.kind} checkpoint; --resume continues a finetune run (give its folder or one of its checkpoints)")
        base = load_run_config(run_dir) if (run_dir / "config.yaml").is_file() else ck.config
        cfg = config_from_mapping(apply_overrides(base, overrides))
        validate(cfg)
        check_compatible(ck.config, to_mapping(cfg), ck.path)
        if checkpoint:
            log.info("resuming %s: the weights come from %s, not from %s", run_dir, ck.path.name, checkpoint)
        backbone, _ = build_backbone(cfg.model.arch, cfg.model.small_stem)
        info = {"source": ck.info.get("source", str(ck.path)), "arch": cfg.model.arch, "small_stem": cfg.model.small_stem,
                "feature_dim": FEATURE_DIMS[cfg.model.arch]}
    else:
        refuse_early("finetune", out, force)
        if not checkpoint:
            raise UserError("give the checkpoint to fine-tune first, e.g. interclr finetune runs/x/checkpoints/ckpt-....safetensors")
        backbone, _, info = load_backbone(checkpoint)
        cfg = resolve_config("finetune", preset, overrides, info)
        run_dir = None
    cfg.eval.protocol = "finetune"
    train_full, val = labelled_splits(cfg)
    positions, how = choose_subset(train_full, cfg)
    train = subset_index(train_full, positions)
    world_batch = cfg.train.batch_size * dist.world_size()
    if len(train) < world_batch:
        raise UserError(f"the labelled subset has {len(train)} images ({how}), fewer than one "
                        f"{'global ' if dist.world_size() > 1 else ''}batch ({world_batch}); lower train.batch_size or use more labels")
    device = rank_device(cfg)
    if ck is not None:
        saved = run_dir / SUBSET_FILE
        if saved.is_file() and read_subset_paths(saved) != list(train.paths):
            raise UserError(f"the labelled subset differs from the one in {saved} (the data or the list changed); resume with the same data")
        prepare_run_dir(run_dir, resume=True, force=False)
    else:
        run_dir = open_run("finetune", cfg, out, force, {"source": info["source"], "arch": describe(info), "subset": how})
        if dist.is_main():
            write_subset(run_dir / SUBSET_FILE, train, how)
    return _fit(cfg, run_dir, device, backbone, info, train, val, how, ck, show_progress)


def _fit(cfg: Config, run_dir: Path, device: torch.device, backbone: nn.Module, info: dict, train: FileIndex, val: FileIndex, how: str,
         ck: Optional[TrainingCheckpoint], show_progress: bool) -> dict:
    seed_everything(cfg.seed)
    num_classes = len(train.classes)
    model = FinetuneNet(backbone, info["feature_dim"], num_classes, cfg.seed).to(device)
    fmt = memory_format(cfg.train.channels_last)
    if cfg.train.channels_last:
        model = model.to(memory_format=fmt)
    # model.sync_bn: the backbone's BatchNorm over the global batch (a no-op on one process)
    model = convert_sync_bn(model, sync_bn=cfg.model.sync_bn, key_bn="none", device=device)
    groups = [{"params": list(model.backbone.parameters())},
              {"params": list(model.fc.parameters()), "lr_mult": cfg.optim.head_lr_mult}]
    _, lr0 = global_lr(cfg)
    optimizer = build_optimizer(cfg.optim, groups, lr0)
    world = dist.world_size()
    loader, sampler = supervised_loader(train, cfg, drop_last=True)
    spe = sampler.steps_per_epoch
    total = spe * cfg.train.epochs
    limit = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    ckpt_dir = run_dir / "checkpoints"
    epoch = step = step_in_epoch = 0
    last: dict = {}
    if ck is not None:
        state = ck.section("model")
        want = model.state_dict()
        bad = [k for k in want if k not in state or tuple(state[k].shape) != tuple(want[k].shape)]
        if bad or len(state) != len(want):
            raise UserError(f"checkpoint {ck.path.name} does not match this model (e.g. {bad[0] if bad else 'extra tensors'}); resume with the run's own data and config")
        model.load_state_dict(state)
        load_optimizer(optimizer, ck.tensors, ck.optimizer_meta)
        restore_rng(ck.tensors, ck.rng_meta)
        epoch, step, step_in_epoch = ck.epoch, ck.step, ck.step_in_epoch
        if step_in_epoch >= spe:
            epoch, step_in_epoch = epoch + 1, 0
        last = dict(ck.info.get("metrics", {}))
        log.info("resumed from %s at epoch %d, step %d", ck.path, epoch, step)
    net = ddp_module(model, device)  # training steps go through the wrapper; evaluation and saving use model
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    reporter = Reporter(enabled=show_progress)
    last_ckpt = list_checkpoints(ckpt_dir)[-1] if ck is not None and list_checkpoints(ckpt_dir) else None
    ck_info = {"classes": list(train.classes), "source": info["source"], "subset": how, "num_labelled": len(train)}

    def save(ep: int, st: int, sie: int) -> Path:
        path = ckpt_dir / checkpoint_name(ep, st)
        sync_bn_buffers(model)  # rank 0's running statistics (a no-op on one process)
        if dist.is_main():
            save_training_checkpoint(path, model_state=model.state_dict(), extra_state={}, optimizer=optimizer,
                                     config=to_mapping(cfg), epoch=ep, step=st, step_in_epoch=sie, kind="finetune",
                                     info={**ck_info, "metrics": last})
            prune_checkpoints(ckpt_dir, cfg.train.keep_last)
        dist.barrier()
        return path

    done = step >= limit
    handler = attach_file_log(run_dir / "train.log")
    try:
        log.info("finetune of %s (%s): %d labelled images (%s), %d classes, %d val images", info["source"], describe(info),
                 len(train), how, num_classes, len(val))
        with reporter:
            model.train()
            while epoch < cfg.train.epochs and not done:
                sampler.set_epoch(epoch, step_in_epoch)
                task = reporter.task(f"finetune epoch {epoch + 1}/{cfg.train.epochs}", total=spe)
                reporter.update(task, advance=step_in_epoch)
                loss_sum = torch.zeros((), device=device)
                seen = skipped = ilog = 0
                t0 = tlog = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]
                for batch in loader:
                    skipped += int(batch.get("skipped", 0))
                    bsz = batch["index"].numel()
                    if bsz == 0:
                        step_in_epoch += 1
                        continue
                    x = batch["image"].to(device, non_blocking=True).to(memory_format=fmt)
                    y = batch["label"].to(device, non_blocking=True)
                    lr = set_lr(optimizer, lr_factor(cfg.optim, step, spe, total))
                    with autocast(device, cfg.train.precision):
                        logits = net(x)
                    loss = F.cross_entropy(logits.float(), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.optim.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    optimizer.step()
                    step += 1
                    step_in_epoch += 1
                    loss_sum += loss.detach() * bsz
                    seen += bsz
                    ilog += bsz * world
                    if step % cfg.train.log_every == 0 or step_in_epoch == spe or step >= limit:
                        loss_v = dist.all_reduce_mean(loss.detach()).item()  # the one sync per logging interval
                        if not math.isfinite(loss_v):
                            raise WorkError(f"finetune loss became {loss_v} at step {step}; the last good checkpoint is kept"
                                            f"{' at ' + str(last_ckpt) if last_ckpt else ''}; lower optim.lr or set optim.grad_clip")
                        now = time.perf_counter()
                        rate = ilog / max(now - tlog, 1e-9)
                        tlog, ilog = now, 0
                        metrics.write({"type": "step", "epoch": epoch + 1, "step": step, "loss": loss_v, "lr": lr,
                                       "head_lr": optimizer.param_groups[1]["lr"], "img_per_s": rate})
                        reporter.update(task, info=f"loss {loss_v:.4f} lr {lr:.4g} {rate:.1f} img/s")
                    reporter.update(task, advance=1)
                    if cfg.train.ckpt_every_steps and step % cfg.train.ckpt_every_steps == 0 and step_in_epoch < spe:
                        last_ckpt = save(epoch, step, step_in_epoch)
                    if step >= limit:
                        done = True
                        break
                reporter.finish(task)
                elapsed = time.perf_counter() - t0
                train_loss, seen, skipped = epoch_totals(loss_sum, seen, skipped)  # every rank's share
                if not math.isfinite(train_loss):
                    raise WorkError(f"finetune loss became {train_loss} in epoch {epoch + 1}; lower optim.lr or set optim.grad_clip")
                finished = step_in_epoch >= spe
                last = _evaluate(model, val, cfg, device, reporter)
                rec = {"type": "epoch", "epoch": epoch + 1, "step": step, "train_loss": train_loss, "lr": lr, **last,
                       "img_per_s": seen / max(elapsed, 1e-9), "seconds": elapsed, "skipped": skipped}
                metrics.write(rec)
                reporter.print(f"epoch {epoch + 1}/{cfg.train.epochs}  step {step}  loss {train_loss:.4f}  val top-1 {last['top1']:.2f}  "
                               f"top-5 {last['top5']:.2f}  {rec['img_per_s']:.1f} img/s")
                if finished:
                    epoch, step_in_epoch = epoch + 1, 0
                    if epoch % cfg.train.ckpt_every == 0 or epoch >= cfg.train.epochs or done:
                        last_ckpt = save(epoch, step, 0)
                elif done:
                    last_ckpt = save(epoch, step, step_in_epoch)
    finally:
        detach_log(handler)
    if not last:
        last = _evaluate(model, val, cfg, device, None)
    result = {
        "top1": last["top1"],
        "top5": last["top5"],
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "run_dir": str(run_dir),
        "epochs": epoch,
        "steps": step,
        "num_labelled": len(train),
        "num_classes": num_classes,
        "num_val": len(val),
        "subset": how,
        "subset_file": str(run_dir / SUBSET_FILE),
        "source": info["source"],
        "arch": describe(info),
    }
    close_run(run_dir, result)
    return result
