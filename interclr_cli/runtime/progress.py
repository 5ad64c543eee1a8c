"""Progress display on stderr (rich), so stdout stays free for ``--json``.

Every bar shows its description, the bar, done/total, a free-form ``info`` text (loss, lr, img/s,
data wait), the elapsed time and an ETA: rich's estimate of that bar, unless the caller sets the
bar's ``eta`` field (seconds), as the training loop does for its whole-run bar (:func:`run_eta`).
"""

from __future__ import annotations

import math
from typing import Optional

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from . import dist

_console: Optional[Console] = None


def console() -> Console:
    """The process's rich console on stderr (created on first use)."""
    global _console
    if _console is None:
        _console = Console(stderr=True)
    return _console


def format_seconds(seconds: float | None) -> str:
    """``H:MM:SS`` (``-:--:--`` when unknown, negative or not finite)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_eta(elapsed: float, steps_done: int, steps_left: int) -> float | None:
    """Seconds left at the average pace so far: ``elapsed / steps_done * steps_left`` (None
    before the first step). ``elapsed`` is wall time since the session started, so time spent
    outside the steps (monitors, validation, checkpoints) is spread over the steps."""
    if steps_done <= 0:
        return None
    return elapsed / steps_done * max(steps_left, 0)


class _EtaColumn(ProgressColumn):
    """``eta H:MM:SS``: the bar's ``eta`` field when set, else rich's estimate for the bar."""

    def __init__(self):
        super().__init__()
        self.rich_eta = TimeRemainingColumn()

    def render(self, task) -> Text:
        if "eta" in task.fields:
            return Text(f"eta {format_seconds(task.fields['eta'])}", style="progress.remaining")
        remaining = self.rich_eta.render(task)
        return Text("eta ", style="progress.remaining") + remaining


class Reporter:
    """A rich progress bar per task with free-form fields (loss, lr, img/s); no-op off rank 0."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and dist.is_main()
        self.progress: Optional[Progress] = None

    def __enter__(self):
        if self.enabled:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                _EtaColumn(),
                console=console(),
                transient=False,
                refresh_per_second=4,
            )
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
            self.progress = None

    def task(self, description: str, total: int | None, completed: int = 0) -> int | None:
        """Add a bar (``total`` None: no known end) at ``completed``; returns its id, or None when disabled."""
        if self.progress is None:
            return None
        return self.progress.add_task(description, total=total, completed=completed, info="")

    def update(self, task: int | None, advance: int = 0, info: str | None = None, **kw) -> None:
        """Advance bar ``task`` by ``advance`` and set its ``info`` text (other ``kw`` go to rich;
        ``eta=seconds`` sets the ETA the bar shows)."""
        if self.progress is None or task is None:
            return
        if info is not None:
            kw["info"] = info
        self.progress.update(task, advance=advance, **kw)

    def finish(self, task: int | None) -> None:
        """Stop bar ``task`` and hide it."""
        if self.progress is not None and task is not None:
            self.progress.stop_task(task)
            self.progress.update(task, visible=False)

    def print(self, message: str) -> None:
        """Print ``message`` on rank 0's console (above the bars when they are shown)."""
        if not dist.is_main():
            return
        if self.progress is not None:
            self.progress.console.print(message, highlight=False)
        else:
            console().print(message, highlight=False)
