"""TensorBoard event files of a training run: the ``metrics.jsonl`` records, mirrored (rank 0 only).

Layout: ``<run>/tensorboard/events.out.tfevents.*``, one file per session (a resume adds one to
the same folder, which TensorBoard reads as one run). Tags: every numeric field ``f`` of a
``type: step`` record is the scalar ``train/f``, of a ``type: epoch`` or ``type: monitor`` record
``epoch/f``; the x axis is always the global optimizer step (the record's ``step``). A task's
histograms (InterCLR: ``epoch/cluster_size``, the member count of every cluster) are written at
the end of every epoch.

Resume without duplicate steps: a session that starts at global step S > 0 (its checkpoint's)
opens its file with ``purge_step = S + 1``, a ``SessionLog.START`` event at S + 1, so TensorBoard's
reader drops what an interrupted session had written past its last checkpoint (those steps run
again and are written again); what was written up to S is kept.

The writer is ``torch.utils.tensorboard.SummaryWriter``; without the ``tensorboard`` package,
:func:`open_tensorboard` returns None and says once how to install it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from ..runtime import dist

log = logging.getLogger("interclr")

TB_DIR = "tensorboard"
#: record type -> tag prefix
_GROUPS = {"step": "train", "epoch": "epoch", "monitor": "epoch"}
#: record fields that are the axes or labels, not values
_AXES = {"type", "epoch", "step"}
_warned = False


def scalar_tags(record: dict) -> dict[str, float]:
    """The tags and values of ``record`` (see the module doc); non-numeric fields are left out."""
    group = _GROUPS.get(record.get("type", ""))
    if group is None:
        return {}
    out = {}
    for k, v in record.items():
        if k in _AXES or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[f"{group}/{k}"] = float(v)
    return out


class TensorBoardLog:
    """Writes records and histograms to ``log_dir`` from global step ``start_step`` on."""

    def __init__(self, log_dir: Path, start_step: int, writer_cls):
        self.log_dir = Path(log_dir)
        purge = start_step + 1 if start_step > 0 else None
        self.writer = writer_cls(log_dir=str(self.log_dir), purge_step=purge, flush_secs=30)

    def record(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for tag, value in scalar_tags(record).items():
            self.writer.add_scalar(tag, value, step)

    def histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        values = values.detach().float().cpu()
        if values.numel():
            self.writer.add_histogram(f"epoch/{name}", values, step)

    def replay(self, metrics_path: Path) -> None:
        """Mirror the records already in ``metrics_path`` (a fresh run's initial monitor pass)."""
        if not Path(metrics_path).is_file():
            return
        for line in Path(metrics_path).read_text().splitlines():
            try:
                self.record(json.loads(line))
            except ValueError:  # a line cut short by a crash
                continue

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(enabled: bool, run_dir: Path, start_step: int) -> Optional[TensorBoardLog]:
    """A :class:`TensorBoardLog` in ``run_dir/tensorboard`` on rank 0 when ``enabled``
    (``log.tensorboard``) and the ``tensorboard`` package is installed; None otherwise."""
    global _warned
    if not enabled or not dist.is_main():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _warned:
            log.info("TensorBoard logging is off: the tensorboard package is missing (pip install 'interclr[viz]')")
            _warned = True
        return None
    return TensorBoardLog(Path(run_dir) / TB_DIR, start_step, SummaryWriter)


def histogram_stats(name: str, values: torch.Tensor) -> dict[str, float]:
    """``<name>_min``, ``_median`` (the lower median, as ``torch.median``) and ``_max`` of ``values``."""
    v = values.detach().float().flatten()
    if v.numel() == 0:
        return {}
    lo, med, hi = torch.stack([v.min(), v.median(), v.max()]).tolist()
    return {f"{name}_min": lo, f"{name}_median": med, f"{name}_max": hi}


__all__ = ["TB_DIR", "TensorBoardLog", "histogram_stats", "open_tensorboard", "scalar_tags"]
