"""The one training loop of every training command (pretrain, finetune, linear-eval).

A command hands :class:`TrainLoop` a :class:`StepTask` (its forward pass and loss, its state and
its end-of-epoch evaluation), an optimizer and a batch sampler with its loader. The loop owns
everything around the step, identically for every command:

- epochs and steps from a :class:`Position` (epoch, global step, batch within the epoch), so a
  run resumes exactly where a checkpoint left it, also mid-epoch (the sampler's order is a
  function of (seed, epoch); the loader's iterator does not consume the global RNG);
- the learning rate of every iteration (:func:`~interclr_cli.training.optim.lr_factor`);
- ``zero_grad`` / ``backward`` / gradient clipping (``optim.grad_clip``) / ``optimizer.step``;
- timing: images per second (global, all ranks) and ``data_wait``, the fraction of wall time the
  loop spent blocked on the loader;
- the non-finite loss check, at every logging step and at the end of every epoch (the only host
  syncs: one all-reduce per ``train.log_every`` steps, one per epoch);
- ``metrics.jsonl`` records (``type: step`` every ``train.log_every`` steps, ``type: epoch``;
  a task's histograms add ``<name>_min/_median/_max`` to the epoch record), mirrored into
  TensorBoard event files (:mod:`~interclr_cli.training.tblog`, ``log.tensorboard``) with the
  histograms themselves;
- ``status.json`` (:mod:`~interclr_cli.training.runstatus`): running with a heartbeat, finished
  or failed, which ``interclr runs`` reads;
- the progress display: a bar for the whole run (steps, loss, lr, img/s, data wait and the
  run's ETA at the session's average pace) and one per epoch; the epoch summary line;
- checkpoint cadence: every ``train.ckpt_every`` epochs, every ``train.ckpt_every_steps``
  steps within an epoch (0 turns either off), and always at the end; the last
  ``train.keep_last`` are kept.

Guarantee: a task whose forward is deterministic given the batch gives bit-identical weights
whether or not the run was interrupted and resumed from any of its checkpoints.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..config.loader import to_mapping
from ..config.schema import Config
from ..errors import WorkError
from ..runtime import dist
from ..runtime.progress import Reporter, format_seconds, run_eta
from .checkpoint import checkpoint_name, prune_checkpoints, save_training_checkpoint
from .features import rng_neutral_iter
from .optim import lr_factor, set_lr
from .rundir import MetricsLog
from .runstatus import RunStatus
from .tblog import histogram_stats, open_tensorboard

log = logging.getLogger("interclr")


@dataclass
class Position:
    """Where a run stands: ``epoch`` (0-based, the epoch in progress), ``step`` (optimizer steps
    done in total) and ``step_in_epoch`` (batches of ``epoch`` already consumed)."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0


@dataclass
class TaskState:
    """What a checkpoint of a task holds besides the optimizer and the RNG states."""

    model: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    kind: str = "pretrain"
    info: dict = field(default_factory=dict)


class StepTask:
    """What a training command gives :class:`TrainLoop`. Override what applies; the defaults do nothing.

    ``forward`` must not sync the host: it returns the loss (a 0-d tensor) and a dict of detached
    0-d tensors to log; the loop reads them every ``train.log_every`` steps.
    """

    #: the progress bar's name of an epoch, e.g. "epoch" or "finetune epoch"
    epoch_name = "epoch"
    #: the command, for messages ("pretrain", "finetune", "linear-eval")
    label = "training"

    def on_epoch_start(self, epoch: int) -> None:
        """Called before every epoch (0-based), also the epoch a resume starts in."""

    def forward(self, batch: dict, pos: Position) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch (as the loader yields it, on the host) and tensors to log."""
        raise NotImplementedError

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        """The parameters ``optim.grad_clip`` clips."""
        return []

    def after_optimizer_step(self, step: int) -> None:
        """After ``optimizer.step()`` of global step ``step`` (0-based): momentum, queues, banks."""

    def step_record(self) -> dict[str, float]:
        """Extra fields for a ``type: step`` record (e.g. the head's learning rate)."""
        return {}

    def histograms(self) -> dict[str, torch.Tensor]:
        """Tensors whose distribution is logged after every epoch (rank 0; e.g. InterCLR's
        cluster sizes): TensorBoard histograms, and their min/median/max in the epoch record."""
        return {}

    def end_epoch(self, record: dict, last: bool) -> tuple[dict, str]:
        """After an epoch (``last``: the run ends with it), given its record so far (``epoch``
        done, ``step``, ``loss``, ``lr``, ``img_per_s``, ``seconds``, ``data_wait``, ``skipped``):
        fields to add to it (monitors, validation) and text for the summary line."""
        return {}, ""

    def state(self) -> TaskState:
        """The task's tensors for a checkpoint (called on every rank: may synchronise buffers)."""
        raise NotImplementedError


@dataclass
class LoopResult:
    """Where the run ended and its last checkpoint (None when none was written)."""

    position: Position
    checkpoint: Optional[Path]
    skipped: int


class TrainLoop:
    """Runs ``task`` over ``loader`` for ``train.epochs`` epochs (or ``train.max_steps`` steps).

    ``sampler`` is the loader's batch sampler (``steps_per_epoch``, ``set_epoch(epoch, start)``);
    ``ckpt_dir`` None writes no checkpoints (linear-eval). Rank 0 alone writes files and shows
    progress; every rank must call :meth:`run`.
    """

    def __init__(
        self,
        cfg: Config,
        task: StepTask,
        optimizer: torch.optim.Optimizer,
        loader,
        sampler,
        *,
        device: torch.device,
        metrics: MetricsLog,
        reporter: Reporter,
        ckpt_dir: Optional[Path],
    ):
        self.cfg, self.task, self.optimizer = cfg, task, optimizer
        self.loader, self.sampler = loader, sampler
        self.device, self.metrics, self.reporter, self.ckpt_dir = device, metrics, reporter, ckpt_dir
        self.world = dist.world_size()
        self.steps_per_epoch = sampler.steps_per_epoch
        self.total_steps = self.steps_per_epoch * cfg.train.epochs  # the schedule's length
        self.limit = min(self.total_steps, cfg.train.max_steps) if cfg.train.max_steps else self.total_steps
        self.last_ckpt: Optional[Path] = None
        self.run_dir = Path(metrics.path).parent
        self.status = RunStatus(self.run_dir, task.label, self.limit, cfg.train.epochs)
        self.status.start()
        self.tb = None
        self.run_bar = None
        self.clock = (time.perf_counter(), 0)  # (wall time, global step) when the session started

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, pos: Position) -> Optional[Path]:
        """Write the checkpoint of ``pos`` (rank 0), prune old ones, wait for every rank."""
        if self.ckpt_dir is None:
            return None
        state = self.task.state()
        path = self.ckpt_dir / checkpoint_name(pos.epoch, pos.step)
        if dist.is_main():
            save_training_checkpoint(
                path,
                model_state=state.model,
                extra_state=state.extra,
                optimizer=self.optimizer,
                config=to_mapping(self.cfg),
                epoch=pos.epoch,
                step=pos.step,
                step_in_epoch=pos.step_in_epoch,
                kind=state.kind,
                info=state.info,
            )
            prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_last)
        dist.barrier()
        self.last_ckpt = path
        return path

    def _diverged(self, value: float, where: str) -> WorkError:
        kept = f"; the last good checkpoint is kept at {self.last_ckpt}" if self.last_ckpt else ""
        return WorkError(
            f"{self.task.label} loss became {value} {where}{kept}; lower optim.lr or enable optim.grad_clip"
        )

    # -- the loop -------------------------------------------------------------------------------
    def run(self, pos: Position, last_checkpoint: Optional[Path] = None) -> LoopResult:
        """Train from ``pos`` to the end; returns the final position and the last checkpoint."""
        self.last_ckpt = last_checkpoint
        if pos.step_in_epoch >= self.steps_per_epoch:  # a checkpoint written at the end of an epoch
            pos = Position(pos.epoch + 1, pos.step, 0)
        self._open_session(pos)
        skipped = 0
        done = pos.step >= self.limit
        try:
            while pos.epoch < self.cfg.train.epochs and not done:
                epoch_skipped, done = self._epoch(pos)
                skipped += epoch_skipped
        except BaseException as e:
            self.status.fail(str(e) or type(e).__name__)
            raise
        finally:
            self._close_session()
        self.status.finish(pos.epoch, pos.step)
        return LoopResult(pos, self.last_ckpt, skipped)

    def _open_session(self, pos: Position) -> None:
        """TensorBoard from ``pos.step`` on (a fresh run first mirrors the records already in
        metrics.jsonl: the initial monitors), the clock of the run's ETA, the whole-run bar."""
        self.tb = open_tensorboard(self.cfg.log.tensorboard, self.run_dir, pos.step)
        if self.tb is not None and pos.step == 0:
            self.tb.replay(self.metrics.path)
        self.clock = (time.perf_counter(), pos.step)
        self.run_bar = self.reporter.task(self.task.label, total=self.limit, completed=pos.step)
        self.status.beat(pos.epoch, pos.step, force=True)

    def _close_session(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        self.reporter.finish(self.run_bar)

    def eta(self, step: int) -> Optional[float]:
        """Seconds left in the run at global step ``step``, at this session's average pace."""
        t0, step0 = self.clock
        return run_eta(time.perf_counter() - t0, step - step0, self.limit - step)

    def _epoch(self, pos: Position) -> tuple[int, bool]:
        """One epoch (or what is left of it) from ``pos``, which it advances; (skipped, done)."""
        cfg, epoch, spe = self.cfg, pos.epoch, self.steps_per_epoch
        self.sampler.set_epoch(epoch, pos.step_in_epoch)
        self.task.on_epoch_start(epoch)
        bar = self.reporter.task(f"{self.task.epoch_name} {epoch + 1}/{cfg.train.epochs}", total=spe)
        self.reporter.update(bar, advance=pos.step_in_epoch)
        meter = _Meter(self.device)
        window = _Window()
        done = False
        for batch, waited in _timed(rng_neutral_iter(self.loader)):
            meter.waited += waited
            window.waited += waited
            meter.skipped += int(batch.get("skipped", 0))
            bsz = batch["index"].numel()
            if bsz == 0:  # every image of the batch was unreadable
                pos.step_in_epoch += 1
                continue
            loss, logs, lr = self._step(batch, pos)
            meter.add(loss, bsz)
            window.images += bsz * self.world
            if pos.step % cfg.train.log_every == 0 or pos.step_in_epoch == spe or pos.step >= self.limit:
                self._log_step(pos, loss, logs, lr, window)
                window = _Window()
            self.reporter.update(bar, advance=1)
            self.reporter.update(self.run_bar, advance=1, eta=self.eta(pos.step))
            if cfg.train.ckpt_every_steps and pos.step % cfg.train.ckpt_every_steps == 0 and pos.step_in_epoch < spe:
                self.save(pos)
            if pos.step >= self.limit:
                done = True
                break
        self.reporter.finish(bar)
        skipped = self._end_epoch(pos, meter, last=done or epoch + 1 >= cfg.train.epochs)
        if pos.step_in_epoch >= spe:
            pos.epoch, pos.step_in_epoch = epoch + 1, 0
            every = cfg.train.ckpt_every  # 0: no per-epoch checkpoints, only the last one
            if (every and pos.epoch % every == 0) or pos.epoch >= cfg.train.epochs or done:
                self.save(pos)
        elif done:
            self.save(pos)
        return skipped, done

    def _step(self, batch: dict, pos: Position) -> tuple[torch.Tensor, dict, float]:
        """One optimizer step at ``pos`` (advanced by one); (loss, logs, learning rate)."""
        lr = set_lr(self.optimizer, lr_factor(self.cfg.optim, pos.step, self.steps_per_epoch, self.total_steps))
        loss, logs = self.task.forward(batch, pos)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.task.parameters()), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.task.after_optimizer_step(pos.step)
        pos.step += 1
        pos.step_in_epoch += 1
        return loss.detach(), logs, lr

    def _log_step(self, pos: Position, loss: torch.Tensor, logs: dict, lr: float, window: "_Window") -> None:
        """A ``type: step`` record (file, TensorBoard) and the progress text (one all-reduce, one host read)."""
        values = torch.stack([loss.float()] + [v.detach().float().reshape(()) for v in logs.values()])
        values = dist.all_reduce_mean(values).tolist()
        loss_v = values[0]
        if not math.isfinite(loss_v):
            raise self._diverged(loss_v, f"at step {pos.step} (epoch {pos.epoch + 1})")
        seconds = max(time.perf_counter() - window.start, 1e-9)
        rate, wait = window.images / seconds, min(1.0, window.waited / seconds)
        rec = {
            "type": "step",
            "epoch": pos.epoch + 1,
            "step": pos.step,
            "loss": loss_v,
            "lr": lr,
            "img_per_s": rate,
            "data_wait": wait,
            **self.task.step_record(),
            **dict(zip(logs, values[1:])),
        }
        self.metrics.write(rec)
        if self.tb is not None:
            self.tb.record(rec)
        self.status.beat(pos.epoch, pos.step)
        self.reporter.update(self.run_bar, info=f"loss {loss_v:.4f} lr {lr:.4g} {rate:.1f} img/s wait {wait:.0%}")

    def _end_epoch(self, pos: Position, meter: "_Meter", last: bool) -> int:
        """The ``type: epoch`` record and summary line; returns the images skipped (all ranks)."""
        seconds = max(time.perf_counter() - meter.start, 1e-9)
        loss, images, skipped = meter.totals()
        if not math.isfinite(loss):
            raise self._diverged(loss, f"in epoch {pos.epoch + 1}")
        rec = {
            "type": "epoch",
            "epoch": pos.epoch + 1,
            "step": pos.step,
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "img_per_s": images / seconds,
            "seconds": seconds,
            "data_wait": min(1.0, meter.waited / seconds),
            "skipped": skipped,
        }
        extra, text = self.task.end_epoch(dict(rec), last)
        rec.update(extra)
        hists = self.task.histograms() if dist.is_main() else {}
        for name, values in hists.items():
            rec.update(histogram_stats(name, values))
        self.metrics.write(rec)
        self._tb_epoch(rec, hists)
        self.status.beat(pos.epoch + (pos.step_in_epoch >= self.steps_per_epoch), pos.step, force=True)
        eta = "" if last else f"  run eta {format_seconds(self.eta(pos.step))}"
        self.reporter.print(
            f"{self.task.epoch_name} {pos.epoch + 1}/{self.cfg.train.epochs}  step {pos.step}  loss {loss:.4f}  "
            f"{rec['img_per_s']:.1f} img/s  {seconds:.1f}s  data wait {rec['data_wait']:.0%}  skipped {skipped}"
            + (f"  {text}" if text else "")
            + eta
        )
        return skipped

    def _tb_epoch(self, rec: dict, hists: dict[str, torch.Tensor]) -> None:
        """The epoch record and the task's histograms into TensorBoard, flushed to disk."""
        if self.tb is None:
            return
        self.tb.record(rec)
        for name, values in hists.items():
            self.tb.histogram(name, values, rec["step"])
        self.tb.flush()


def _timed(iterator):
    """Yield (item, seconds spent waiting for it) from ``iterator``."""
    while True:
        t0 = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        yield item, time.perf_counter() - t0


class _Window:
    """Images and data wait since the last step record."""

    def __init__(self):
        self.start = time.perf_counter()
        self.images = 0
        self.waited = 0.0


class _Meter:
    """An epoch's loss (summed on the device, no sync per step), images, skipped images, data wait."""

    def __init__(self, device: torch.device):
        self.start = time.perf_counter()
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.images = 0
        self.skipped = 0
        self.waited = 0.0

    def add(self, loss: torch.Tensor, batch_size: int) -> None:
        self.loss_sum += loss.double() * batch_size
        self.images += batch_size

    def totals(self) -> tuple[float, int, int]:
        """(mean loss per image, images, skipped) over every rank: one all-reduce."""
        t = torch.stack(
            [self.loss_sum, self.loss_sum.new_tensor(float(self.images)), self.loss_sum.new_tensor(float(self.skipped))]
        )
        total, images, skipped = dist.all_reduce_sum(t).tolist()
        return total / max(images, 1), int(images), int(skipped)
