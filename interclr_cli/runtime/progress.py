"""Progress display on stderr (rich), so stdout stays free for ``--json``."""

from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import dist

_console: Optional[Console] = None


def console() -> Console:
    """The process's rich console on stderr (created on first use)."""
    global _console
    if _console is None:
        _console = Console(stderr=True)
    return _console


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
                TextColumn("eta"),
                TimeRemainingColumn(),
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

    def task(self, description: str, total: int | None) -> int | None:
        """Add a bar (``total`` None: no known end); returns its id, or None when disabled."""
        if self.progress is None:
            return None
        return self.progress.add_task(description, total=total, info="")

    def update(self, task: int | None, advance: int = 0, info: str | None = None, **kw) -> None:
        """Advance bar ``task`` by ``advance`` and set its ``info`` text (other ``kw`` go to rich)."""
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
