from pathlib import Path

import pytest
from PIL import Image

from interclr_cli.commands.contact_sheet import PAD, contact_sheet


def solid(color, size=(50, 30)):
    return Image.new("RGB", size, color)


def test_grid_size_and_thumbnail_pixels(tmp_path: Path):
    rows = [[solid((255, 0, 0)), solid((0, 255, 0)), solid((0, 0, 255))], [solid((10, 20, 30), (20, 80))]]
    out = tmp_path / "sheets" / "clusters.png"
    size = contact_sheet(rows, out, thumb=16)
    with Image.open(out) as sheet:
        assert sheet.format == "PNG"
        assert sheet.size == size == (PAD + 3 * (16 + PAD), PAD + 2 * (16 + PAD))
        sheet = sheet.convert("RGB")
        # centre of row 0, column 1 and of row 1, column 0
        assert sheet.getpixel((PAD + (16 + PAD) + 8, PAD + 8)) == (0, 255, 0)
        assert sheet.getpixel((PAD + 8, PAD + (16 + PAD) + 8)) == (10, 20, 30)
        # the empty cell of row 1 stays background
        assert sheet.getpixel((PAD + 2 * (16 + PAD) + 8, PAD + (16 + PAD) + 8)) == (255, 255, 255)
    assert [p.name for p in out.parent.iterdir()] == ["clusters.png"]


def test_labels_add_a_left_column(tmp_path: Path):
    rows = [[solid((200, 100, 0))], [solid((0, 100, 200)), solid((0, 0, 0))]]
    plain = contact_sheet(rows, tmp_path / "a.png", thumb=32)
    labelled = contact_sheet(rows, tmp_path / "b.png", thumb=32, labels=["cluster 0 (n=12)", "cluster 1"])
    assert labelled[1] == plain[1] and labelled[0] > plain[0]
    offset = labelled[0] - plain[0]
    with Image.open(tmp_path / "b.png") as sheet:
        sheet = sheet.convert("RGB")
        assert sheet.getpixel((offset + PAD + 16, PAD + (32 + PAD) + 16)) == (0, 100, 200)
        label_area = sheet.crop((0, PAD, offset, PAD + 32))
        assert min(c[0] for _, c in label_area.getcolors(maxcolors=4096)) < 64  # dark text was drawn


def test_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError):
        contact_sheet([], tmp_path / "x.png")
    with pytest.raises(ValueError):
        contact_sheet([[solid((0, 0, 0))]], tmp_path / "x.png", labels=["a", "b"])
