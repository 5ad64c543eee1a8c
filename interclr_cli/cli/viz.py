"""`interclr report` and `interclr runs`: parse, call the command, print."""

from __future__ import annotations

from typing import List, Optional

import typer

from ..commands.report import run_report
from ..commands.runs import run_runs
from .common import JsonOpt, emit_json, show_result

REPORT_HELP = """Write one self-contained HTML page (and its PNGs) of one or more runs: loss terms and lr vs
step, kNN and RankMe vs epoch, img/s, InterCLR's cluster statistics, several runs overlaid, a table of
the config keys that differ and each run's final figures. Works on a run that is still training.

Needs matplotlib: pip install 'interclr\\[viz]'.

Examples:

  interclr report runs/quickstart                       # writes runs/quickstart/report.html

  interclr report runs/a runs/b -o compare.html         # two runs overlaid; PNGs in compare_files/
"""

RUNS_HELP = """List the runs under a folder (default: runs): command, method, preset, epochs done / planned,
last kNN top-1 and RankMe, top-1 (a linear-eval run's own; for a pretrain run, that of the newest
linear-eval run of one of its checkpoints) and status: running, finished or failed.

Examples:

  interclr runs

  interclr runs /scratch/me/runs --json | jq '.runs[] | select(.status == "failed") | .path'
"""


def report(
    runs: List[str] = typer.Argument(
        ..., help="Run folders (each holds config.yaml and metrics.jsonl).", show_default=False
    ),
    out: Optional[str] = typer.Option(
        None, "--out", "-o", help="The page (default: RUN/report.html for one run, ./report.html for several)."
    ),
    as_json: bool = JsonOpt,
) -> None:
    result = run_report(list(runs), out)
    show_result({"report": result["report"], "figures": len(result["figures"])} if not as_json else result, as_json)


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def runs(
    folder: Optional[str] = typer.Argument(
        None, help="Folder holding run folders (default: runs).", show_default=False
    ),
    as_json: bool = JsonOpt,
) -> None:
    result = run_runs(folder)
    if as_json:
        emit_json(result)
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"runs in {result['dir']}", box=None, header_style="bold")
    longest = max((len(r["name"]) for r in result["runs"]), default=4)
    t.add_column("name", no_wrap=True, min_width=min(longest, 48))  # the column that is never folded
    for col in ("command", "method", "preset", "epochs", "kNN", "RankMe", "top-1", "status"):
        right = col in ("epochs", "kNN", "RankMe", "top-1")
        t.add_column(col, justify="right" if right else "left", overflow="fold", no_wrap=col == "status")
    colours = {"running": "yellow", "finished": "green", "failed": "red"}
    for r in result["runs"]:
        epochs = f"{r['epochs_done']}/{r['epochs_planned']}" if r["epochs_planned"] else "-"
        top1 = r["top1"] if r["top1"] is not None else r["linear_top1"]
        cells = [r["name"], r["command"], _cell(r["method"]), _cell(r["preset"]), epochs]
        cells += [_cell(r["knn_top1"]), _cell(r["rankme"]), _cell(top1)]
        t.add_row(*(Text(c) for c in cells), Text(r["status"], style=colours.get(r["status"], "")))
    Console().print(t if result["runs"] else f"no runs under {result['dir']}")


report.__doc__ = REPORT_HELP
runs.__doc__ = RUNS_HELP


def register(app: typer.Typer) -> None:
    app.command("report", help=REPORT_HELP)(report)
    app.command("runs", help=RUNS_HELP)(runs)
