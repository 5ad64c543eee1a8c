"""The `interclr` executable: one typer app, one small module per command."""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import typer

from ..errors import InterclrError
from . import presets as presets_cmd
from .evaluate import register as register_evaluate
from .invariance import register as register_invariance
from .pretrain import pretrain
from .viz import register as register_viz

app = typer.Typer(
    name="interclr",
    help="""Self-supervised visual pretraining with InterCLR (Xie et al., arXiv 2008.11702) and MoCo v2.

Examples:

  interclr presets                                   # what can I run?

  interclr pretrain --preset quickstart              # 5 minutes on a laptop CPU, built-in images

  interclr pretrain --preset r50-imagenet data.root=/data/imagenet/train

  interclr linear-eval runs/x/checkpoints/ckpt-e0200-s00100000.safetensors --preset linear-r50-imagenet data.root=/data/imagenet

  interclr export ckpt.safetensors -o resnet50.safetensors
""",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("pretrain", help=pretrain.__doc__)(pretrain)
app.add_typer(presets_cmd.app, name="presets")
register_evaluate(app)  # linear-eval, finetune, knn, cluster, rankme, export
register_invariance(app)  # invariance
register_viz(app)  # report, runs


def _preprocess(argv: list[str]) -> list[str]:
    """Let ``--resume`` take an optional value: alone (or before an option/override) it means latest."""
    out = []
    for i, a in enumerate(argv):
        out.append(a)
        if a == "--resume":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or nxt.startswith("-") or "=" in nxt:
                from ..commands.pretrain import LATEST

                out.append(LATEST)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    args = _preprocess(list(sys.argv[1:] if argv is None else argv))
    code = 0
    from ..runtime import dist, launch

    who = ""
    try:
        # under torchrun / srun: join the process group (rank 0 alone prints and writes files)
        if launch.init_distributed() and not dist.is_main():
            who = f"[rank {dist.rank()}] "
        # standalone mode: usage errors print their message and exit 2, --help exits 0
        app(args=args, prog_name="interclr", standalone_mode=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except InterclrError as e:
        sys.stderr.write(f"{who}error: {e}\n")
        code = e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        code = 130
    except Exception as e:  # an internal bug: one line unless debugging
        from ..runtime.safefile import is_storage_error, storage_error_from

        if is_storage_error(e):  # a full disk, a quota, a read-only folder: the storage, not a bug
            sys.stderr.write(f"{who}error: {storage_error_from(e)}\n")
            launch.teardown()
            sys.exit(1)
        if os.environ.get("INTERCLR_DEBUG"):
            raise
        logging.getLogger("interclr").debug("internal error", exc_info=True)
        sys.stderr.write(
            f"internal error: {type(e).__name__}: {e} (set INTERCLR_DEBUG=1 for a traceback, and please report it)\n"
        )
        code = 1
    launch.teardown()
    sys.exit(code)
