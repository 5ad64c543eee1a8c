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
rates follow the global batch (:func:`~interclr_cli.training.optim.global_lr`), every
process trains on its slice of each global batch under DistributedDataParallel, ``model.sync_bn``
synchronises the backbone's BatchNorm over the global batch (else BatchNorm is per process and
the running statistics are rank 0's), validation is extracted sharded, rank 0 alone writes the
run folder, and on ``--resume`` every process loads the same checkpoint (checked).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config.schema import Config
from ..data.sources import FileIndex
from ..errors import UserError
from ..eval.linear import score_classifier
from ..eval.subsets import stratified_subset, subset_from_list
from ..models import FEATURE_DIMS, build_backbone
from ..runtime import dist
from ..runtime.ddp import convert_sync_bn, ddp_module, sync_bn_buffers
from ..runtime.device import autocast, memory_format, process_device
from ..runtime.progress import Reporter
from ..runtime.safefile import atomic_write_bytes
from ..runtime.seed import seed_everything
from ..training.autochoice import channels_last_on, resolve_auto
from ..training.checkpoint import TrainingCheckpoint, list_checkpoints
from ..training.features import extract_with_config, subset_index
from ..training.loop import Position, StepTask, TaskState, TrainLoop
from ..training.optim import build_optimizer, global_lr
from ..training.resume import load_model_state, open_resume, restore_training
from ..training.rundir import MetricsLog, file_log, prepare_run_dir
from .common import close_run, labelled_splits, open_run, refuse_early, resolve_config, supervised_loader
from .linear_eval import new_linear
from .loading import CheckpointInfo, load_backbone

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
        return stratified_subset(
            np.asarray(train.labels), d.label_fraction, cfg.seed
        ), f"stratified {d.label_fraction:g} (seed {cfg.seed})"
    return np.arange(len(train), dtype=np.int64), "all labels"


def write_subset(path: Path, index: FileIndex, how: str) -> None:
    """A file list (``path label`` per line, ``#`` comments) of the labelled subset."""
    lines = [
        f"# interclr finetune labelled subset: {how}; {len(index)} images, {len(index.classes)} classes",
        f"# classes: {' '.join(index.classes)}",
    ]
    lines += [f"{p} {int(ln)}" for p, ln in zip(index.paths, np.asarray(index.labels).tolist())]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


def read_subset_paths(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            out.append(line.rsplit(" ", 1)[0])
    return out


def evaluate(model: nn.Module, val: FileIndex, cfg: Config, device, reporter) -> dict:
    """Validation loss and top-1/top-5 of ``model`` (not its DDP wrapper: the extraction is
    sharded, so ranks may run different numbers of batches), with rank 0's BN statistics."""
    sync_bn_buffers(model)
    was = model.training
    model.eval()
    try:
        (logits,), y = extract_with_config(model, val, cfg, device, reporter, "val")
    finally:
        model.train(was)
    return score_classifier(lambda x: x, logits, y.to(device))


class FinetuneTask(StepTask):
    """One fine-tuning step (cross-entropy of the whole network, through DDP when distributed), a
    validation pass after every epoch, and the network's state for checkpoints."""

    epoch_name = "finetune epoch"
    label = "finetune"

    def __init__(
        self,
        cfg: Config,
        model: "FinetuneNet",
        net: nn.Module,
        optimizer,
        val: FileIndex,
        device,
        reporter,
        info: dict,
        last: dict,
    ):
        self.cfg, self.model, self.net, self.optimizer, self.val = cfg, model, net, optimizer, val
        self.device, self.reporter, self.info, self.last = device, reporter, info, last
        self.fmt = memory_format(channels_last_on(cfg))

    def on_epoch_start(self, epoch: int) -> None:
        self.model.train()  # the loaded backbone comes in eval mode; validation restores the mode

    def forward(self, batch: dict, pos: Position):
        x = batch["image"].to(self.device, non_blocking=True).to(memory_format=self.fmt)
        y = batch["label"].to(self.device, non_blocking=True)
        with autocast(self.device, self.cfg.train.precision):
            logits = self.net(x)
        return F.cross_entropy(logits.float(), y), {}

    def parameters(self):
        return self.model.parameters()

    def step_record(self) -> dict[str, float]:
        return {"head_lr": self.optimizer.param_groups[1]["lr"]}

    def end_epoch(self, record: dict, last: bool) -> tuple[dict, str]:
        self.last = evaluate(self.model, self.val, self.cfg, self.device, self.reporter)
        return dict(self.last), f"val top-1 {self.last['top1']:.2f}  top-5 {self.last['top5']:.2f}"

    def state(self) -> TaskState:
        sync_bn_buffers(self.model)  # rank 0's running statistics (a no-op on one process)
        return TaskState(model=self.model.state_dict(), kind="finetune", info={**self.info, "metrics": self.last})


def _resume_backbone(resume: str, out: Optional[str], overrides: list[str], force: bool, checkpoint: Optional[str]):
    """--resume: (run folder, checkpoint, config, fresh backbone, info) of the run to continue."""
    run_dir, ck, cfg = open_resume(resume, out, overrides, kind="finetune", force=force)
    if checkpoint:
        log.info("resuming %s: the weights come from %s, not from %s", run_dir, ck.path.name, checkpoint)
    backbone, _ = build_backbone(cfg.model.arch, cfg.model.small_stem)
    info = CheckpointInfo(
        source=ck.info.get("source", str(ck.path)),
        kind="finetune",
        arch=cfg.model.arch,
        small_stem=cfg.model.small_stem,
        feature_dim=FEATURE_DIMS[cfg.model.arch],
    )
    return run_dir, ck, cfg, backbone, info


def run_finetune(
    checkpoint: Optional[str],
    preset: Optional[str],
    overrides: list[str],
    *,
    out: Optional[str],
    resume: Optional[str] = None,
    force: bool = False,
    show_progress: bool = True,
) -> dict:
    """Fine-tune ``checkpoint`` (or continue the run ``resume`` names); the JSON-ready result:
    ``top1``, ``top5``, ``checkpoint``, ``num_labelled``, ``subset``, ``run_dir`` ..."""
    ck = None
    if resume is not None:
        run_dir, ck, cfg, backbone, info = _resume_backbone(resume, out, overrides, force, checkpoint)
    else:
        refuse_early("finetune", out, force)
        if not checkpoint:
            raise UserError(
                "give the checkpoint to fine-tune first, e.g. interclr finetune runs/x/checkpoints/ckpt-....safetensors"
            )
        backbone, _, info = load_backbone(checkpoint)
        cfg = resolve_config("finetune", preset, overrides, info)
        run_dir = None
    cfg.eval.protocol = "finetune"
    train_full, val = labelled_splits(cfg)
    positions, how = choose_subset(train_full, cfg)
    train = subset_index(train_full, positions)
    world_batch = cfg.train.batch_size * dist.world_size()
    if len(train) < world_batch:
        raise UserError(
            f"the labelled subset has {len(train)} images ({how}), fewer than one "
            f"{'global ' if dist.world_size() > 1 else ''}batch ({world_batch}); lower train.batch_size or use more labels"
        )
    device = process_device(cfg.device)
    resolve_auto(cfg, device)  # precision and memory format for this device, recorded in config.yaml
    if ck is not None:
        saved = run_dir / SUBSET_FILE
        if saved.is_file() and read_subset_paths(saved) != list(train.paths):
            raise UserError(
                f"the labelled subset differs from the one in {saved} (the data or the list changed); resume with the same data"
            )
        prepare_run_dir(run_dir, resume=True, force=False)
    else:
        run_dir = open_run(
            "finetune", cfg, out, force, {"source": info.source, "arch": info.description, "subset": how}
        )
        if dist.is_main():
            write_subset(run_dir / SUBSET_FILE, train, how)
    return _fit(cfg, run_dir, device, backbone, info, train, val, how, ck, show_progress)


def _fit(
    cfg: Config,
    run_dir: Path,
    device: torch.device,
    backbone: nn.Module,
    info: CheckpointInfo,
    train: FileIndex,
    val: FileIndex,
    how: str,
    ck: Optional[TrainingCheckpoint],
    show_progress: bool,
) -> dict:
    seed_everything(cfg.seed)
    model = FinetuneNet(backbone, info.feature_dim, len(train.classes), cfg.seed).to(device)
    if channels_last_on(cfg):
        model = model.to(memory_format=memory_format(True))
    # model.sync_bn: the backbone's BatchNorm over the global batch (a no-op on one process)
    model = convert_sync_bn(model, sync_bn=cfg.model.sync_bn, key_bn="none", device=device)
    groups = [
        {"params": list(model.backbone.parameters())},
        {"params": list(model.fc.parameters()), "lr_mult": cfg.optim.head_lr_mult},
    ]
    _, lr0 = global_lr(cfg.optim, cfg.train.batch_size, dist.world_size())
    optimizer = build_optimizer(cfg.optim, groups, lr0)
    loader, sampler = supervised_loader(train, cfg, drop_last=True)
    pos, last, ckpt_dir = Position(), {}, run_dir / "checkpoints"
    if ck is not None:
        load_model_state(model, ck.section("model"), ck)
        pos = restore_training(ck, optimizer)
        last = dict(ck.info.get("metrics", {}))
    net = ddp_module(model, device)  # training steps go through the wrapper; evaluation and saving use model
    reporter = Reporter(enabled=show_progress)
    ck_info = {"classes": list(train.classes), "source": info.source, "subset": how, "num_labelled": len(train)}
    task = FinetuneTask(cfg, model, net, optimizer, val, device, reporter, ck_info, last)
    loop = TrainLoop(
        cfg,
        task,
        optimizer,
        loader,
        sampler,
        device=device,
        metrics=MetricsLog(run_dir / "metrics.jsonl"),
        reporter=reporter,
        ckpt_dir=ckpt_dir,
    )
    previous = list_checkpoints(ckpt_dir)[-1:] if ck is not None else []
    with file_log(run_dir / "train.log"):
        log.info(
            "finetune of %s (%s): %d labelled images (%s), %d classes, %d val images",
            info.source,
            info.description,
            len(train),
            how,
            len(train.classes),
            len(val),
        )
        with reporter:
            res = loop.run(pos, previous[0] if previous else None)
    last = task.last or evaluate(model, val, cfg, device, None)
    result = {
        "top1": last["top1"],
        "top5": last["top5"],
        "checkpoint": str(res.checkpoint) if res.checkpoint else None,
        "run_dir": str(run_dir),
        "epochs": res.position.epoch,
        "steps": res.position.step,
        "num_labelled": len(train),
        "num_classes": len(train.classes),
        "num_val": len(val),
        "subset": how,
        "subset_file": str(run_dir / SUBSET_FILE),
        "source": info.source,
        "arch": info.description,
    }
    close_run(run_dir, result)
    return result
