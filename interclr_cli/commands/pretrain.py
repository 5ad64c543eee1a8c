"""`interclr pretrain` as a function: config resolution, run folder, resume, training."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config.loader import apply_overrides, config_from_mapping, load_config, validate
from ..errors import UserError
from ..training.checkpoint import TrainingCheckpoint
from ..training.rundir import check_run_dir, default_run_dir, prepare_run_dir
from ..training.pretraining import Trainer, latest_checkpoint, load_run_config

LATEST = "__latest__"


def resolve_resume(resume: str, out: Optional[str]) -> tuple[Path, Path]:
    """(run folder, checkpoint file) for ``--resume`` (latest in --out) or ``--resume PATH``."""
    if resume == LATEST:
        if not out:
            raise UserError("--resume without a path needs --out RUN_FOLDER (or give --resume PATH to a run folder or checkpoint)")
        run_dir = Path(out)
        return run_dir, latest_checkpoint(run_dir)
    p = Path(resume)
    if p.is_dir():
        return (Path(out) if out else p), latest_checkpoint(p)
    if not p.exists():
        raise UserError(f"--resume {p} does not exist; give a run folder or a .safetensors checkpoint")
    run_dir = Path(out) if out else (p.parent.parent if p.parent.name == "checkpoints" else p.parent)
    return run_dir, p


def run_pretrain(preset: Optional[str], overrides: list[str], *, out: Optional[str], resume: Optional[str],
                 force: bool, show_progress: bool = True) -> dict:
    if resume is not None:
        if force:
            raise UserError("--resume and --force contradict each other; use one")
        run_dir, ckpt_path = resolve_resume(resume, out)
        ck = TrainingCheckpoint(ckpt_path)  # validates the file before anything else
        base = ck.config if not (run_dir / "config.yaml").is_file() else load_run_config(run_dir)
        cfg = config_from_mapping(apply_overrides(base, overrides))
        validate(cfg)
        prepare_run_dir(run_dir, resume=True, force=False)
    else:
        if not preset:
            raise UserError("--preset is required (e.g. --preset quickstart); `interclr presets` lists them")
        cfg = load_config(preset, overrides)
        run_dir = Path(out) if out else default_run_dir(cfg.name)
        ckpt_path = None
        check_run_dir(run_dir, force=force)  # refuse early; the folder is created once the data is known good
    prepare = None if resume is not None else (lambda: prepare_run_dir(run_dir, resume=False, force=force))
    result = Trainer(cfg, run_dir, resume_from=ckpt_path, show_progress=show_progress, prepare=prepare).fit()
    summary = {
        "run_dir": str(result.run_dir),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "epochs": result.epochs,
        "steps": result.steps,
        "skipped": result.skipped,
        "method": cfg.method.name,
    }
    summary.update(result.metrics)
    return summary
