"""`interclr invariance CKPT [CKPT ...]`: parse, call :func:`run_invariance`, print."""

from __future__ import annotations

import math
from typing import List, Optional

import typer

from ..errors import UserError
from ..runtime.safefile import verification
from .common import ForceOpt, JsonOpt, NoVerifyOpt, PresetOpt, emit_json, setup_logging

QuietOpt = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr; no progress bars.")


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    """Positional arguments: checkpoints first, then ``key=value`` overrides (a checkpoint path
    never holds '=' here unless it exists as a file)."""
    from pathlib import Path

    ckpts, ov = [], []
    for a in args:
        if "=" in a and not a.startswith("random:") and not Path(a).exists():
            ov.append(a)
        elif ov:
            raise UserError(f"checkpoint {a!r} after the overrides; give the checkpoints first, then key=value")
        else:
            ckpts.append(a)
    return ckpts, ov


def _print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..commands.invariance import short_name

    sources = [c["source"] for c in result["checkpoints"]]
    t = Table(title=f"invariance (top-{result['top_k']} mean I = L/G, layer {result['layer']})")
    t.add_column("family")
    for s in sources:
        t.add_column(short_name(s), justify="right")
    rows = {(r["family"], r["checkpoint"]): r for r in result["results"]}
    for f in result["families"]:
        cells = []
        for s in sources:
            r = rows[(f, s)]
            q = r["quartiles"]
            cells.append(f"{r['score']:.2f}  [dim](median {q[1]:.2f})[/dim]" if math.isfinite(r["score"]) else "nan")
        t.add_row(f, *cells)
    con = Console(stderr=False)
    con.print(t)
    con.print(f"chart: {result['png']}\nrun folder: {result['run_dir']}")


ArgsArg = typer.Argument(
    ...,
    help="Checkpoints (pretrain/finetune/export files or random:ARCH), then key=value overrides.",
    show_default=False,
)
RunOutOpt = typer.Option(None, "--out", "-o", help="Run folder (default: runs/invariance-<timestamp>).")
AugmentOpt = typer.Option(
    None,
    "--augment",
    help="Augmentation family; repeat for several: crop, occlusion, colour, flip, blur, grayscale, rotation "
    "(default: all, or none with --sets).",
    show_default=False,
)
SetsOpt = typer.Option(
    None,
    "--sets",
    help="CSV of your own sets: path,set_id[,label] rows (e.g. views of one object).",
    show_default=False,
)
ViewsOpt = typer.Option(
    None, "--views", help="Views per image and family, the image itself included (default 8).", show_default=False
)
ImagesOpt = typer.Option(
    None, "--images", help="Images of data.root for the families (seeded subset; default 1000).", show_default=False
)
LayerOpt = typer.Option(
    None,
    "--layer",
    help="backbone (pooled features, default), embedding (projection head), layer1, layer2 or layer3 (pooled).",
    show_default=False,
)
TopKOpt = typer.Option(
    None, "--top-k", help="Score = mean over the k most invariant units (default 25, the paper's).", show_default=False
)
RateOpt = typer.Option(
    None, "--firing-rate", help="Fraction of all images each unit fires on (default 0.05).", show_default=False
)


def invariance(
    args: List[str] = ArgsArg,
    preset: Optional[str] = PresetOpt,
    out: Optional[str] = RunOutOpt,
    augment: Optional[List[str]] = AugmentOpt,
    sets: Optional[str] = SetsOpt,
    views: Optional[int] = ViewsOpt,
    images: Optional[int] = ImagesOpt,
    layer: Optional[str] = LayerOpt,
    top_k: Optional[int] = TopKOpt,
    firing_rate: Optional[float] = RateOpt,
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    no_verify: bool = NoVerifyOpt,
) -> None:
    from ..commands.invariance import run_invariance

    setup_logging(quiet)
    checkpoints, ov = _split(list(args or []))
    if augment:
        ov.append("invariance.augment=" + ",".join(augment))
    elif sets is not None:
        ov.append("invariance.augment=")
    if sets is not None:
        ov.append(f"invariance.sets={sets}")
    for key, value in (("views", views), ("images", images), ("layer", layer), ("top_k", top_k)):
        if value is not None:
            ov.append(f"invariance.{key}={value}")
    if firing_rate is not None:
        ov.append(f"invariance.firing_rate={firing_rate!r}")
    with verification(not no_verify):
        result = run_invariance(checkpoints, preset, ov, out=out, force=force, show_progress=not quiet)
    if as_json:
        emit_json(result)
    else:
        _print_table(result)


invariance.__doc__ = """Measure what a representation is invariant to: the firing-rate invariance score.

Goodfellow et al. (NeurIPS 2009), as used by Purushwalkam & Gupta (arXiv 2007.13916): each unit of the layer
fires on the 5% of all images where it is highest (global firing rate G); over sets of related images (the
views of one image under one augmentation family, or your own sets) the local firing rate L is the fraction of
a set on which a unit keeps firing; invariance I = L / G; the score is the mean I of the 25 most invariant
units (per class of sets, then averaged). Higher = more invariant; a unit that fires on whole sets reaches
1 / G = 20. The same images and views are used for every checkpoint (seeded). Writes result.json and
invariance.png (bars: families x checkpoints). --json keys: scores (family -> checkpoint -> score), results
(one row per checkpoint and family: score, score_percent, quartiles, num_sets ...), families, layer, top_k,
firing_rate, png, run_dir. Config keys: invariance.* (`interclr presets keys`).

The checkpoints accept what every command accepts (random:resnet18 is the baseline). Give --preset when they
were trained at different image sizes so that all see the same images (e.g. --preset quickstart).

Examples:

  interclr invariance random:resnet18 runs/quick/checkpoints/ckpt-e0012-s00000936.safetensors --preset quickstart

  interclr invariance ckpt.safetensors --augment crop --augment colour --views 16 data.root=/data/imagenet/val

  interclr invariance ckpt.safetensors --sets viewpoints.csv --layer embedding --json | jq .scores
"""


def register(app: typer.Typer) -> None:
    app.command("invariance", help=invariance.__doc__)(invariance)
