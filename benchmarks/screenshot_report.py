"""Screenshot a report page in a headless browser, to check it as a person sees it.

    python benchmarks/screenshot_report.py runs/quickstart/report.html -o report.png [--height 2000]

Uses Chromium (Debian: ``apt-get install chromium``) or Chrome, whichever is on PATH, with a
throwaway profile and no network features; prints the PNG's path and size. Not part of the test
suite's requirements: tests/test_viz.py runs it only where a browser is installed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 2000, timeout: float = 120) -> Path:
    """Render ``page`` (a local HTML file) at ``width`` x ``height`` into the PNG ``out``."""
    if not Path(page).is_file():
        raise FileNotFoundError(f"{page} does not exist; write it first with `interclr report RUN -o {page}`")
    browser = find_browser()
    if browser is None:
        raise RuntimeError(f"no browser found (looked for {', '.join(BROWSERS)}); apt-get install chromium")
    out = Path(out).resolve()
    with tempfile.TemporaryDirectory(prefix="interclr-chromium-") as profile:
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={out}",
            f"--window-size={width},{height}",
            Path(page).resolve().as_uri(),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not out.is_file():
        raise RuntimeError(f"{Path(browser).name} wrote no screenshot (exit {res.returncode}): {res.stderr[-500:]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("page", type=Path)
    ap.add_argument("-o", "--out", type=Path, default=Path("report.png"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2000)
    args = ap.parse_args()
    path = screenshot(args.page, args.out, args.width, args.height)
    from PIL import Image

    with Image.open(path) as im:
        print(f"{path} {im.size[0]}x{im.size[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
