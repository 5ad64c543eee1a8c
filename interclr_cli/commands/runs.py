"""`interclr runs [DIR]`: the runs under a folder, one summary each (see :mod:`.runinfo`).

Each run's row is :func:`~interclr_cli.commands.runinfo.summarise` plus, for a pretrain run,
``linear_top1`` and ``linear_run``: the top-1 of the newest linear-eval run (with a result)
whose checkpoint is one of this run's (its ``run.json`` ``source`` is ``<run>/checkpoints/<file>``,
matched by resolved path, else by the run folder's name). ``status`` is running, finished or
failed, decided by :func:`~interclr_cli.training.runstatus.run_state`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .runinfo import RunInfo, find_runs, read_run, summarise


def _points_at(source: str, run: RunInfo) -> bool:
    """Whether checkpoint path ``source`` lies in ``run``'s checkpoints/ folder."""
    if not source or source.startswith("random:"):
        return False
    src = Path(source)
    if src.parent.name != "checkpoints":
        return False
    folder = src.parent.parent
    try:
        if folder.resolve() == run.path.resolve():
            return True
    except OSError:
        pass
    return folder.name == run.path.name


def linear_results(runs: list[RunInfo]) -> dict[Path, tuple[float, str]]:
    """Pretrain run folder -> (top-1, name) of the newest linear-eval run evaluating one of its checkpoints."""
    out: dict[Path, tuple[float, str]] = {}
    evals = [r for r in runs if r.command == "linear-eval" and isinstance(r.result.get("top1"), (int, float))]
    for run in runs:
        if run.command != "pretrain":
            continue
        for ev in evals:  # oldest first: the newest wins
            if _points_at(ev.source, run):
                out[run.path] = (float(ev.result["top1"]), ev.name)
    return out


def run_runs(folder: Optional[str] = None) -> dict:
    """The runs under ``folder`` (default ``runs``); the JSON-ready result: ``dir`` and ``runs``
    (a list of rows, oldest first; ``name`` is the path relative to ``dir``)."""
    root = Path(folder or "runs")
    runs = [read_run(p) for p in find_runs(root)]
    for r in runs:
        rel = r.path.relative_to(root) if r.path != root else Path(r.path.name)
        r.label = str(rel) if str(rel) != "." else r.path.name
    linear = linear_results(runs)
    rows = []
    for r in runs:
        row = summarise(r)
        top1, name = linear.get(r.path, (None, None))
        row.update(linear_top1=top1, linear_run=name)
        rows.append(row)
    return {"dir": str(root), "runs": rows}


__all__ = ["linear_results", "run_runs"]
