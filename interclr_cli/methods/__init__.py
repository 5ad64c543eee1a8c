"""Registry of self-supervised methods (one file per method)."""

from __future__ import annotations

from ..config.schema import Config
from ..errors import UserError
from .base import Method, TrainContext


def _mocov2():
    from .mocov2 import MoCoV2

    return MoCoV2


def _interclr():
    from .interclr import InterCLR

    return InterCLR


def _npid():
    from .npid import NPID

    return NPID


def _invp():
    from .invp import InvP

    return InvP


METHODS = {"mocov2": _mocov2, "interclr": _interclr, "npid": _npid, "invp": _invp}


def build_method(cfg: Config, num_samples: int) -> Method:
    if cfg.method.name not in METHODS:
        raise UserError(f"unknown method {cfg.method.name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[cfg.method.name]()(cfg, num_samples)


__all__ = ["METHODS", "Method", "TrainContext", "build_method"]
