"""Run directories: ``runs/<name>/`` with config.yaml, metrics.jsonl, a log and checkpoints/."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..runtime import dist

RUN_MARKER = "config.yaml"


def default_run_dir(name: str, root: Path = Path("runs")) -> Path:
    return root / f"{name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(path: Path, *, force: bool) -> None:
    """Raise the refusal ``prepare_run_dir`` would raise for a new run, without touching anything."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file; choose a folder path")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise UserError(
                f"run folder {path} already exists and is not empty; pass --resume to continue it, --force to overwrite it, or choose another --out"
            )
        if not (path / RUN_MARKER).is_file():
            raise UserError(
                f"{path} is not empty and is not an interclr run folder; refusing to overwrite it even with --force; choose another --out"
            )


def prepare_run_dir(path: Path, *, resume: bool, force: bool) -> Path:
    """Create or reuse a run directory, refusing to clobber one without ``--resume``/``--force``.

    ``--force`` only ever deletes a folder that is an interclr run (it holds config.yaml); any other
    non-empty folder is refused even then, so a mistyped ``--out`` cannot delete user files.
    """
    path = Path(path)
    if resume:
        if path.exists() and not path.is_dir():
            raise UserError(f"--out {path} is a file; choose a folder path")
        if not (path / RUN_MARKER).is_file():
            raise UserError(f"cannot resume: {path} is not an interclr run folder (no {RUN_MARKER}); check --out")
        return path
    check_run_dir(path, force=force)
    dist.barrier()  # every rank has inspected the folder before rank 0 starts deleting it
    if dist.is_main() and path.is_dir() and any(path.iterdir()):  # an interclr run, and --force
        shutil.rmtree(path)
    dist.barrier()
    if dist.is_main():
        path.mkdir(parents=True, exist_ok=True)
        (path / "checkpoints").mkdir(exist_ok=True)
    dist.barrier()
    return path


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        if not dist.is_main():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_clean(record)) + "\n")


@contextlib.contextmanager
def file_log(path: Path):
    """Mirror the ``interclr`` logger into ``path`` for the duration (rank 0 only)."""
    if not dist.is_main():
        yield
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("interclr")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
