"""`interclr report RUN [RUN ...]`: one self-contained HTML page of runs, and its PNGs.

The page (``-o``, default ``RUN/report.html`` for one run, ``./report.html`` for several) holds a
table of the runs (status, epochs, steps and final figures), the config keys whose values differ
between them (one run: its main settings), and the figures of :mod:`.plots`, embedded as base64
PNGs; the same PNGs are written beside it in ``<page stem>_files/``. It reads the run folders only
(:mod:`.runinfo`), so it works on a run still training and on finetune and linear-eval runs.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from .plots import COLOURS, draw_figure, figure_specs, require_matplotlib
from .runinfo import RunInfo, config_differences, read_run, summarise, unique_labels

#: the settings shown for a single run (there is nothing to compare it with)
MAIN_SETTINGS = (
    "name",
    "method.name",
    "model.arch",
    "data.root",
    "data.image_size",
    "train.epochs",
    "train.batch_size",
    "optim.lr",
    "optim.schedule",
    "seed",
)
_COLUMNS = (
    ("status", "status"),
    ("command", "command"),
    ("method", "method"),
    ("epochs", None),
    ("steps", "steps"),
    ("final loss", "loss"),
    ("kNN top-1", "knn_top1"),
    ("RankMe", "rankme"),
    ("top-1", "top1"),
    ("img/s", "img_per_s"),
)
_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px 32px; color: #222;
       max-width: 1240px; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.meta { color: #666; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 6px; }
.finished { color: #1a7f37; } .running { color: #9a6700; } .failed { color: #cf222e; }
figure { margin: 18px 0; } figure img { width: 100%; max-width: 1200px; border: 1px solid #eee; }
figcaption { color: #666; font-size: 12px; }
"""


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def _runs_table(runs: list[RunInfo]) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for t, _ in _COLUMNS)
    rows = []
    for i, run in enumerate(runs):
        s = summarise(run)
        cells = []
        for _, key in _COLUMNS:
            if key is None:
                done, planned = s["epochs_done"], s["epochs_planned"]
                cells.append(f'<td class="num">{_fmt(done)} / {_fmt(planned)}</td>' if planned else "<td>–</td>")
            elif key == "status":
                title = html.escape(s["reason"] or "", quote=True)
                cells.append(f'<td class="{s["status"]}" title="{title}">{html.escape(s["status"])}</td>')
            else:
                v = s[key]
                cells.append(f'<td class="num">{_fmt(v)}</td>' if isinstance(v, float) else f"<td>{_fmt(v)}</td>")
        swatch = f'<span class="swatch" style="background:{COLOURS[i % len(COLOURS)]}"></span>'
        name = (
            f'<td>{swatch}<b>{html.escape(run.name)}</b><br><span class="meta">{html.escape(str(run.path))}</span></td>'
        )
        rows.append("<tr>" + name + "".join(cells) + "</tr>")
    return f"<table><tr><th>run</th>{head}</tr>{''.join(rows)}</table>"


def _config_table(runs: list[RunInfo]) -> str:
    if len(runs) == 1:
        run = runs[0]
        rows = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(run.setting(k)))}</td></tr>" for k in MAIN_SETTINGS
        )
        return f'<p class="meta">One run: its main settings (config.yaml has them all).</p><table>{rows}</table>'
    diffs = config_differences(runs)
    if not diffs:
        return '<p class="meta">The runs have the same configuration.</p>'
    head = "".join(f"<th>{html.escape(r.name)}</th>" for r in runs)
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in values) + "</tr>"
        for k, values in diffs
    )
    return f'<p class="meta">Only the keys whose values differ.</p><table><tr><th>key</th>{head}</tr>{rows}</table>'


def _figure_html(path: Path, title: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(title, quote=True)}">'
        f"<figcaption>{html.escape(path.parent.name)}/{html.escape(path.name)}</figcaption></figure>"
    )


def render_html(runs: list[RunInfo], figures: list[tuple[Path, str]]) -> str:
    """The page: the runs table, the config table, the figures (embedded)."""
    names = ", ".join(r.name for r in runs)
    figs = "".join(_figure_html(p, t) for p, t in figures) or '<p class="meta">No metrics recorded yet.</p>'
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>interclr report: {html.escape(names)}</title>'
        f"<style>{_CSS}</style></head><body><h1>interclr report</h1>"
        f'<p class="meta">{len(runs)} run{"s" if len(runs) > 1 else ""}, read {time.strftime("%Y-%m-%d %H:%M:%S")}</p>'
        f"<h2>Runs</h2>{_runs_table(runs)}<h2>Configuration</h2>{_config_table(runs)}<h2>Figures</h2>{figs}"
        "</body></html>\n"
    )


def default_output(runs: list[str]) -> Path:
    return Path(runs[0]) / "report.html" if len(runs) == 1 else Path("report.html")


def run_report(run_dirs: list[str], out: Optional[str] = None) -> dict:
    """Write the report of ``run_dirs`` to ``out``; the JSON-ready result: ``report`` (the page),
    ``figures`` (the PNG paths), ``runs`` (the folders)."""
    if not run_dirs:
        raise UserError("name at least one run folder, e.g. interclr report runs/quickstart")
    require_matplotlib()  # before any work: the one-line install hint
    runs = [read_run(Path(p)) for p in run_dirs]
    unique_labels(runs)
    page = Path(out) if out else default_output(run_dirs)
    if page.is_dir():
        raise UserError(f"-o {page} is a folder; give the page's file name, e.g. -o {page / 'report.html'}")
    assets = page.with_name(page.stem + "_files")
    figures = [(draw_figure(spec, runs, assets / f"{spec.stem}.png"), spec.title) for spec in figure_specs(runs)]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render_html(runs, figures), encoding="utf-8")
    return {"report": str(page), "figures": [str(p) for p, _ in figures], "runs": [str(r.path) for r in runs]}


__all__ = ["default_output", "render_html", "run_report"]
