"""Shared fixtures: tiny labelled image trees (copied from the built-in set) and CLI runners.

Disk: a ResNet-18 checkpoint is ~130 MB and the suite writes ~17 GB in all, so nothing is kept
that a passing test wrote: ``tmp_path_retention_policy = "failed"`` (pyproject) removes each
passing test's ``tmp_path`` at its end, and module fixtures take :func:`scratch`, removed when
their module ends. The peak stays near the largest module's data (about 2 GB).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ROOT / "interclr_cli" / "builtin" / "cifar10-mini"
SHARED = ROOT.parent / "shared" / "data" / "cifar10"

# Small, fast settings for end-to-end runs on 2 CPU cores.
TINY = [
    "model.arch=resnet18",
    "model.small_stem=false",
    "model.head_hidden=64",
    "model.embed_dim=32",
    "data.image_size=16",
    "data.eval_resize=16",
    "data.num_workers=0",
    "method.queue_size=64",
    "train.batch_size=8",
    "train.log_every=2",
    "device=cpu",
    "monitor.every=0",
]


@contextlib.contextmanager
def scratch(tmp_path_factory, name: str) -> Iterator[Path]:
    """A module fixture's folder (``tmp_path_factory.mktemp(name)``), removed when the ``with``
    ends: a module-scoped fixture yields inside it, so the folder goes when its module does."""
    path = tmp_path_factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_tree(dest: Path, per_class: int, classes: int = 4, split: str = "train") -> Path:
    """An ImageFolder tree with ``per_class`` real CIFAR images in each of ``classes`` classes."""
    src = BUILTIN / split
    for c in sorted(os.listdir(src))[:classes]:
        (dest / c).mkdir(parents=True, exist_ok=True)
        for f in sorted(os.listdir(src / c))[:per_class]:
            shutil.copy(src / c / f, dest / c / f)
    return dest


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """tmp/data/{train,test}: 4 classes, 12 train and 4 test images each."""
    make_tree(tmp_path / "data" / "train", 12)
    make_tree(tmp_path / "data" / "test", 4, split="test")
    return tmp_path / "data"


def run_cli(
    *args: str, timeout: float = 300, env: dict | None = None, subprocess_: bool = False
) -> subprocess.CompletedProcess:
    """Run ``interclr ARGS``: in-process by default (fast: torch is imported once), or as a real
    ``python -m interclr_cli`` subprocess. Returns a CompletedProcess either way."""
    if not subprocess_ and env is None:
        return _run_in_process(list(args))
    e = dict(os.environ)
    e.pop("INTERCLR_DEBUG", None)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "interclr_cli", *args], capture_output=True, text=True, timeout=timeout, env=e
    )


def assert_clean_error(res: subprocess.CompletedProcess, code: int = 2, fragment: str | None = None) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert lines, "no error message"
    last = lines[-1]
    assert last.startswith(("error:", "Error:")) or "Error" in last or "error" in last, res.stderr
    if fragment is not None:
        assert fragment in res.stderr, res.stderr


def _run_in_process(args: list[str]) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import logging

    from interclr_cli.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    logger = logging.getLogger("interclr")
    saved = list(logger.handlers)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            logger.handlers = saved
    return subprocess.CompletedProcess(["interclr", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits on a shared 2-core machine.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
