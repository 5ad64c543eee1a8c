"""The report's figures: PNGs of runs' metrics, several runs overlaid (matplotlib, Agg canvas).

Each figure is a grid of panels, :data:`COLUMNS` wide; a panel plots one or more record fields
(line style per field) of every run (colour per run) against the global step or the epoch.
Panels no run has data for are left out, and so is a figure left without panels. A figure of n
panels is exactly :func:`figure_size` (n) pixels. matplotlib is imported when a figure is drawn;
without it :func:`require_matplotlib` raises a one-line :class:`~interclr_cli.errors.UserError`
that says how to install it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .runinfo import RunInfo

PANEL_W, PANEL_H, HEADER_H, DPI = 600, 340, 70, 100
COLUMNS = 2
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
STYLES = ["-", "--", ":", "-."]
INSTALL_HINT = "pip install 'interclr[viz]'"


@dataclass(frozen=True)
class Panel:
    """One plot: ``keys`` of the ``kind`` records (``step`` or ``epoch``)."""

    title: str
    kind: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class FigureSpec:
    stem: str
    title: str
    panels: tuple[Panel, ...]


_CLUSTERS = (
    Panel("fraction of the batch relabelled", "step", ("label_change",)),
    Panel("cluster size per step (min / max)", "step", ("min_cluster_size", "max_cluster_size")),
    Panel(
        "cluster size after each epoch (min / median / max)",
        "epoch",
        ("cluster_size_min", "cluster_size_median", "cluster_size_max"),
    ),
    Panel("empty clusters / small clusters fixed", "step", ("empty_clusters", "small_clusters_fixed")),
)
_MONITORS = (
    Panel("kNN top-1 (%)", "epoch", ("knn_top1",)),
    Panel("RankMe (embedding / backbone)", "epoch", ("rankme", "rankme_backbone")),
    Panel("validation top-1 / top-5 (%)", "epoch", ("top1", "top5")),
    Panel("mean training loss per epoch", "epoch", ("loss", "train_loss")),
)
_THROUGHPUT = (
    Panel("images / s (all processes)", "step", ("img_per_s",)),
    Panel("data wait (fraction of wall time)", "step", ("data_wait",)),
)
#: step fields the fixed figures plot (the loss terms are found by name)
_KNOWN_STEP = {k for p in _CLUSTERS + _THROUGHPUT for k in p.keys} | {"lr", "head_lr"}


def require_matplotlib():
    """matplotlib's Figure class (Agg canvas), or a UserError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(f"the report draws with matplotlib, which is not installed; {INSTALL_HINT}") from None
    return Figure


def figure_size(n_panels: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure of ``n_panels`` panels."""
    rows = max(1, math.ceil(n_panels / COLUMNS))
    return COLUMNS * PANEL_W, HEADER_H + rows * PANEL_H


def figure_specs(runs: list[RunInfo]) -> list[FigureSpec]:
    """The figures for ``runs``: losses and lr, monitors, throughput, InterCLR's clusters, other
    step fields (any the fixed figures do not name), each with only the panels some run has."""
    step_keys = list(dict.fromkeys(k for r in runs for k in r.keys("step")))
    losses = tuple(Panel(f"{k} per step", "step", (k,)) for k in step_keys if k.startswith("loss"))
    others = tuple(Panel(k, "step", (k,)) for k in step_keys if not k.startswith("loss") and k not in _KNOWN_STEP)
    specs = [
        FigureSpec(
            "losses",
            "Loss terms and learning rate vs step",
            losses + (Panel("learning rate", "step", ("lr", "head_lr")),),
        ),
        FigureSpec("monitors", "kNN, RankMe and validation vs epoch", _MONITORS),
        FigureSpec("throughput", "Throughput vs step", _THROUGHPUT),
        FigureSpec("clusters", "InterCLR pseudo-labels", _CLUSTERS),
        FigureSpec("other", "Other step fields", others),
    ]
    out = []
    for spec in specs:
        panels = tuple(p for p in spec.panels if any(r.series(p.kind, k)[0] for r in runs for k in p.keys))
        if panels:
            out.append(FigureSpec(spec.stem, spec.title, panels))
    return out


def _draw_panel(ax, panel: Panel, runs: list[RunInfo]) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    keys_with_data = [k for k in panel.keys if any(r.series(panel.kind, k)[0] for r in runs)]
    for i, run in enumerate(runs):
        for j, key in enumerate(keys_with_data):
            xs, ys = run.series(panel.kind, key)
            if xs:
                marker = "o" if panel.kind == "epoch" and len(xs) <= 50 else None
                style = STYLES[j % len(STYLES)]
                ax.plot(xs, ys, style, color=COLOURS[i % len(COLOURS)], marker=marker, ms=3, lw=1.4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are whole numbers
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("global step" if panel.kind == "step" else "epoch (0 = before training)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    if len(keys_with_data) > 1:  # which line style is which field (the colours are the runs)
        styles = [
            Line2D([], [], color="#555555", linestyle=STYLES[j % len(STYLES)]) for j in range(len(keys_with_data))
        ]
        ax.legend(styles, keys_with_data, fontsize=7, loc="best")


def draw_figure(spec: FigureSpec, runs: list[RunInfo], path: Path) -> Path:
    """Draw ``spec`` for ``runs`` into the PNG ``path`` (exactly :func:`figure_size` pixels)."""
    Figure = require_matplotlib()
    from matplotlib.lines import Line2D

    w, h = figure_size(len(spec.panels))
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    rows = max(1, math.ceil(len(spec.panels) / COLUMNS))
    # margins in pixels: the header band on top, room for the last row's axis label below
    grid = fig.add_gridspec(
        rows, COLUMNS, left=0.07, right=0.98, bottom=55 / h, top=1 - HEADER_H / h, hspace=0.45, wspace=0.2
    )
    for n, panel in enumerate(spec.panels):
        _draw_panel(fig.add_subplot(grid[n // COLUMNS, n % COLUMNS]), panel, runs)
    shown = [i for i, r in enumerate(runs) if any(r.series(p.kind, k)[0] for p in spec.panels for k in p.keys)]
    handles = [Line2D([], [], color=COLOURS[i % len(COLOURS)], lw=2) for i in shown]  # a run keeps its colour
    fig.legend(
        handles,
        [runs[i].name for i in shown],
        loc="upper right",
        bbox_to_anchor=(0.98, 1.0),
        ncol=min(4, max(1, len(shown))),
        fontsize=9,
        frameon=False,
    )
    fig.suptitle(spec.title, x=0.07, ha="left", fontsize=12, fontweight="bold")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


__all__ = ["COLOURS", "FigureSpec", "Panel", "draw_figure", "figure_size", "figure_specs", "require_matplotlib"]
