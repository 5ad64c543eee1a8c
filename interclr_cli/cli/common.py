"""Shared CLI plumbing: logging to stderr, JSON to stdout, option definitions."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Optional

import typer
from rich.logging import RichHandler

from ..runtime.progress import console

PresetOpt = typer.Option(None, "--preset", "-p", help="Preset name (see `interclr presets`) or path to a YAML file.")
OutOpt = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<preset>-<timestamp>).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object with the results on stdout (logs go to stderr).")
ForceOpt = typer.Option(False, "--force", help="Overwrite an existing run folder.")
NoVerifyOpt = typer.Option(
    False,
    "--no-verify",
    help="Load checkpoints without checking the digest interclr writes into them (files of other tools have none).",
)
OverridesArg = typer.Argument(
    None, help="Config overrides key.sub=value, e.g. optim.lr=0.06 data.root=/data/cifar.", show_default=False
)


def setup_logging(quiet: bool = False) -> None:
    logger = logging.getLogger("interclr")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        h = RichHandler(console=console(), show_time=False, show_path=False, markup=False)
        h.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(h)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def show_result(result: dict, as_json: bool, title: Optional[str] = None) -> None:
    if as_json:
        emit_json(result)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_header=False, box=None)
    for k, v in result.items():
        t.add_row(f"[bold]{k}[/bold]", f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(t)
