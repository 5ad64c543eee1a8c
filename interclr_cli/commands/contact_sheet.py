"""Contact sheets: a grid of thumbnails, one row per cluster, to look at what a cluster holds."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..runtime.safefile import atomic_target

PAD = 2
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


def contact_sheet(
    rows: list[list[Image.Image]],
    out: Path,
    thumb: int = 64,
    labels: list[str] | None = None,
) -> tuple[int, int]:
    """Write a PNG grid to ``out``: row r holds ``rows[r]`` as ``thumb`` x ``thumb`` thumbnails.

    Images are converted to RGB, centre-cropped to a square and resized (bicubic). With
    ``labels`` each row's label is written in a column at the left. Cell (r, c) starts at
    x = label_width + PAD + c * (thumb + PAD), y = PAD + r * (thumb + PAD) on a white background.
    The file is written to a temporary name and renamed. Returns the sheet's (width, height).
    """
    if not rows:
        raise ValueError("contact_sheet needs at least one row")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"{len(labels)} labels for {len(rows)} rows")
    font = ImageFont.load_default()
    label_width = 0
    if labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_width = max(probe.textbbox((0, 0), str(t), font=font)[2] for t in labels) + 2 * PAD + 2
    columns = max((len(r) for r in rows), default=0)
    width = label_width + PAD + max(columns, 1) * (thumb + PAD)
    height = PAD + len(rows) * (thumb + PAD)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for r, images in enumerate(rows):
        y = PAD + r * (thumb + PAD)
        if labels:
            top, bottom = draw.textbbox((0, 0), str(labels[r]), font=font)[1::2]
            draw.text((PAD, y + (thumb - (bottom - top)) // 2 - top), str(labels[r]), fill=TEXT, font=font)
        for c, image in enumerate(images):
            tile = ImageOps.fit(image.convert("RGB"), (thumb, thumb), method=Image.Resampling.BICUBIC)
            sheet.paste(tile, (label_width + PAD + c * (thumb + PAD), y))
    with atomic_target(Path(out)) as tmp:  # no half-written PNG; storage errors as one line
        sheet.save(tmp, format="PNG")
    return sheet.size
