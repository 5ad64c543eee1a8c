"""`interclr pretrain`: parse, call the engine, print."""

from __future__ import annotations

from typing import List, Optional

import typer

from ..commands.pretrain import run_pretrain
from ..runtime.safefile import verification
from .common import ForceOpt, JsonOpt, NoVerifyOpt, OutOpt, OverridesArg, PresetOpt, setup_logging, show_result

HELP = """Pretrain a backbone (InterCLR or MoCo v2) on unlabeled images.

Examples:

  interclr pretrain --preset quickstart

  interclr pretrain --preset r18-cifar data.root=/data/cifar10/train optim.lr=0.06

  interclr pretrain --preset r50-imagenet data.root=/data/imagenet/train --out runs/in1k

  interclr pretrain --out runs/in1k --resume              # continue from the latest checkpoint

  interclr pretrain --resume runs/in1k/checkpoints/ckpt-e0010-s00050040.safetensors

  interclr pretrain --preset quickstart train.max_steps=20 --json | jq .checkpoint

Overrides are checked against the schema; `interclr presets keys` lists every key and its allowed values.
"""


def pretrain(
    overrides: Optional[List[str]] = OverridesArg,
    preset: Optional[str] = PresetOpt,
    out: Optional[str] = OutOpt,
    resume: Optional[str] = typer.Option(
        None,
        "--resume",
        help="Continue a run: alone, the latest checkpoint in --out; or a run folder or checkpoint path.",
        show_default=False,
    ),
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr; no progress bars."),
    no_verify: bool = NoVerifyOpt,
) -> None:
    setup_logging(quiet)
    with verification(not no_verify):
        result = run_pretrain(
            preset, list(overrides or []), out=out, resume=resume, force=force, show_progress=not quiet
        )
    show_result(result, as_json, title="pretrain")


pretrain.__doc__ = HELP
