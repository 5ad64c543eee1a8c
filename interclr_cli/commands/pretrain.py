"""`interclr pretrain` as a function: config resolution, run folder, resume, then training."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config.loader import load_config
from ..errors import UserError
from ..training.pretraining import pretrain
from ..training.resume import LATEST, open_resume
from ..training.rundir import check_run_dir, default_run_dir, prepare_run_dir
from .runinfo import read_records

__all__ = ["LATEST", "run_pretrain"]


def run_pretrain(
    preset: Optional[str],
    overrides: list[str],
    *,
    out: Optional[str],
    resume: Optional[str],
    force: bool,
    show_progress: bool = True,
) -> dict:
    """Pretrain a new run from ``preset`` + ``overrides`` into ``out`` (default
    ``runs/<preset>-<timestamp>``), or continue the run ``resume`` names; the JSON-ready summary:
    ``run_dir``, ``checkpoint``, ``epochs``, ``steps``, ``skipped``, ``method`` and the last monitors."""
    if resume is not None:
        run_dir, ck, cfg = open_resume(resume, out, overrides, kind="pretrain", force=force)
        prepare_run_dir(run_dir, resume=True, force=False)
        prepare = None
    else:
        if not preset:
            raise UserError("--preset is required (e.g. --preset quickstart); `interclr presets` lists them")
        cfg = load_config(preset, overrides)
        run_dir = Path(out) if out else default_run_dir(cfg.name)
        ck = None
        check_run_dir(run_dir, force=force)  # refuse early; the folder is created once the data is known good

        def prepare() -> None:
            prepare_run_dir(run_dir, resume=False, force=force)

    result = pretrain(cfg, run_dir, resume=ck, show_progress=show_progress, prepare=prepare)
    return {
        "run_dir": str(result.run_dir),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "epochs": result.epochs,
        "steps": result.steps,
        "skipped": result.skipped,
        "method": cfg.method.name,
        "losses": last_losses(result.run_dir),
        **result.metrics,
    }


def last_losses(run_dir: Path) -> dict:
    """The loss terms (``loss`` and every ``loss_*``) of the last ``type: step`` record of the run's
    ``metrics.jsonl`` (rank 0's file); {} when there is none."""
    steps = [r for r in read_records(Path(run_dir) / "metrics.jsonl") if r.get("type") == "step"]
    if not steps:
        return {}
    return {k: v for k, v in steps[-1].items() if k == "loss" or k.startswith("loss_")}
