"""A grouped bar chart drawn with PIL (no plotting library): one group per category, one bar per
series inside each group, a y axis with ticks and a legend. Used for ``invariance.png``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from ..runtime.safefile import atomic_target

#: Colours of the series, in order (Tableau 10); series beyond 10 reuse them.
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
GRID = (225, 225, 225)
PLOT_HEIGHT = 240
BAR_WIDTH = 18
GROUP_GAP = 20
LEFT, RIGHT, TOP = 60, 16, 34
TICKS = 5


def nice_ceiling(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 or 10 times a power of ten that is >= ``x`` (1 for x <= 0)."""
    if not (x > 0 and math.isfinite(x)):
        return 1.0
    base = 10.0 ** math.floor(math.log10(x))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * base >= x * (1 - 1e-12):
            return m * base
    return 10.0 * base


def bar_boxes(values: Sequence[Sequence[Optional[float]]], ymax: float) -> list[list[Optional[tuple]]]:
    """Pixel boxes ``(x0, y0, x1, y1)`` (inclusive) of bar [series][group] for ``values``
    [series][group]; None for a missing or non-finite value. Group g starts at
    ``LEFT + GROUP_GAP / 2 + g * (S * BAR_WIDTH + GROUP_GAP)``; a bar of value v rises
    ``round(v / ymax * PLOT_HEIGHT)`` pixels above the baseline ``y = TOP + PLOT_HEIGHT``."""
    s = len(values)
    base = TOP + PLOT_HEIGHT
    boxes: list[list[Optional[tuple]]] = []
    for j, row in enumerate(values):
        out: list[Optional[tuple]] = []
        for g, v in enumerate(row):
            if v is None or not math.isfinite(v):
                out.append(None)
                continue
            x0 = LEFT + GROUP_GAP // 2 + g * (s * BAR_WIDTH + GROUP_GAP) + j * BAR_WIDTH
            h = int(round(max(0.0, min(v, ymax)) / ymax * PLOT_HEIGHT))
            out.append((x0, base - h, x0 + BAR_WIDTH - 2, base - 1) if h > 0 else None)
        boxes.append(out)
    return boxes


def _legend_rows(draw: ImageDraw.ImageDraw, series: Sequence[str], font, width: int) -> list[list[int]]:
    rows, cur, x = [], [], LEFT
    for j, name in enumerate(series):
        w = 16 + draw.textbbox((0, 0), name, font=font)[2] + 16
        if cur and x + w > width - RIGHT:
            rows.append(cur)
            cur, x = [], LEFT
        cur.append(j)
        x += w
    if cur:
        rows.append(cur)
    return rows


def grouped_bar_chart(
    groups: Sequence[str],
    series: Sequence[str],
    values: Sequence[Sequence[Optional[float]]],
    out: Path,
    *,
    title: str = "",
    ylabel: str = "",
) -> tuple[int, int]:
    """Write a PNG grouped bar chart of ``values`` [series][group] to ``out`` (via a temporary file
    and a rename); the y axis runs from 0 to :func:`nice_ceiling` of the largest value, bars are
    placed by :func:`bar_boxes`, series j has colour ``PALETTE[j % 10]``. Returns (width, height)."""
    if not groups or not series or len(values) != len(series) or any(len(r) != len(groups) for r in values):
        raise ValueError(f"values must be [series={len(series)}][groups={len(groups)}], non-empty")
    font = ImageFont.load_default()
    finite = [v for r in values for v in r if v is not None and math.isfinite(v)]
    ymax = nice_ceiling(max(finite, default=0.0))
    plot_w = len(groups) * (len(series) * BAR_WIDTH + GROUP_GAP)
    width = max(LEFT + plot_w + RIGHT, 360)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend = _legend_rows(probe, series, font, width)
    height = TOP + PLOT_HEIGHT + 24 + 16 * len(legend) + 8
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    base = TOP + PLOT_HEIGHT
    for t in range(TICKS + 1):
        y = base - int(round(t / TICKS * PLOT_HEIGHT))
        if t:
            draw.line([(LEFT, y), (LEFT + plot_w, y)], fill=GRID)
        label = f"{ymax * t / TICKS:g}"
        tw = draw.textbbox((0, 0), label, font=font)[2]
        draw.text((LEFT - 6 - tw, y - 5), label, fill=INK, font=font)
    for j, row in enumerate(bar_boxes(values, ymax)):
        for box in row:
            if box is not None:
                draw.rectangle(box, fill=PALETTE[j % len(PALETTE)])
    draw.line([(LEFT, TOP), (LEFT, base)], fill=INK)
    draw.line([(LEFT, base), (LEFT + plot_w, base)], fill=INK)
    group_w = len(series) * BAR_WIDTH + GROUP_GAP
    for g, name in enumerate(groups):
        tw = draw.textbbox((0, 0), name, font=font)[2]
        draw.text((LEFT + g * group_w + (group_w - tw) // 2, base + 6), name, fill=INK, font=font)
    draw.text((LEFT, 8), title, fill=INK, font=font)
    if ylabel:
        draw.text((4, 20), ylabel, fill=INK, font=font)
    for r, members in enumerate(legend):
        x, y = LEFT, base + 24 + 16 * r
        for j in members:
            draw.rectangle((x, y + 1, x + 10, y + 11), fill=PALETTE[j % len(PALETTE)])
            draw.text((x + 16, y), series[j], fill=INK, font=font)
            x += 16 + draw.textbbox((0, 0), series[j], font=font)[2] + 16
    with atomic_target(Path(out)) as tmp:  # no half-written PNG; storage errors as one line
        img.save(tmp, format="PNG")
    return img.size
