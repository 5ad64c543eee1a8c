"""Resolve a config's ``auto`` values for the training device, once, and write them back.

:func:`resolve_auto` turns ``train.precision``, ``train.channels_last``, ``eval.precision``,
``data.augment_on`` and ``data.decode`` from ``auto`` into the values the rules of
:mod:`interclr_cli.runtime.precision` choose for this machine, writes them into ``cfg`` (so the
run's ``config.yaml`` and its checkpoints record them, and a resumed run reuses them), sets the
CUDA backend switches, and logs one line saying what was chosen and why. Values already set
(explicitly, or by an earlier call) are kept.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from ..config.schema import Config
from ..runtime import dist
from ..runtime.precision import (
    Caps,
    configure_cuda_backends,
    device_caps,
    jpeg_share,
    resolve_augment_on,
    resolve_channels_last,
    resolve_decode,
    resolve_precision,
)

log = logging.getLogger("interclr")


def resolve_auto(
    cfg: Config, device: torch.device, paths: Optional[Sequence[str]] = None, caps: Optional[Caps] = None
) -> dict[str, tuple[str, str]]:
    """Resolve every ``auto`` of ``cfg`` for ``device`` (``paths``: the training files, for the
    JPEG rule of ``data.decode``; without them ``decode=auto`` becomes ``pil``). Distributed: a
    collective call, every rank decides from rank 0's capabilities. Returns
    key -> (value, reason) for the keys that were ``auto``; logs them in one line."""
    kind = device.type
    # rank 0's capabilities on every rank (every rank calls this): all ranks choose alike
    caps = dist.broadcast_object(caps if caps is not None else device_caps(device))
    t, d = cfg.train, cfg.data
    chosen: dict[str, tuple[str, str]] = {}

    def take(key: str, requested: str, decided: tuple[str, str]) -> str:
        if requested == "auto":
            chosen[key] = decided
        return decided[0]

    t.precision = take("train.precision", t.precision, resolve_precision(t.precision, kind, caps))
    t.channels_last = take(
        "train.channels_last", t.channels_last, resolve_channels_last(t.channels_last, kind, caps, dist.world_size())
    )
    ev = cfg.eval.precision
    cfg.eval.precision = take("eval.precision", ev, (t.precision if ev == "auto" else ev, "as train.precision"))
    d.augment_on = take(
        "data.augment_on", d.augment_on, resolve_augment_on(d.augment_on, kind, in_memory=d.in_memory, decode=d.decode)
    )
    share = jpeg_share(paths) if paths is not None else 0.0
    decided = resolve_decode(d.decode, kind, augment_on=d.augment_on, jpeg_share=share)
    if paths is None and decided[0] == "device" and d.decode == "auto":
        decided = ("pil", "no training files to check for JPEGs")
    d.decode = take("data.decode", d.decode, decided)
    backends = configure_cuda_backends(device, cudnn_benchmark=t.cudnn_benchmark, tf32=t.tf32)
    if chosen or backends:
        parts = [f"{k}={v} ({why})" for k, (v, why) in chosen.items()] + backends
        log.info(f"on {caps.line() if kind == 'cpu' else caps.name}: " + ", ".join(parts))
    return chosen


def channels_last_on(cfg: Config, device: Optional[torch.device] = None) -> bool:
    """``train.channels_last`` as a bool; ``auto`` (not resolved yet) is decided for ``device`` and
    this launch's number of processes, as :func:`resolve_auto` would (off without a device)."""
    value = cfg.train.channels_last
    if value == "auto" and device is not None:
        value = resolve_channels_last("auto", device.type, device_caps(device), dist.world_size())[0]
    return value == "true"


def extraction_precision(cfg: Config, device: torch.device) -> str:
    """The precision of a feature extraction: ``eval.precision``, else the (resolved) ``train.precision``."""
    if cfg.eval.precision != "auto":
        return cfg.eval.precision
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return resolve_precision("auto", device.type, device_caps(device))[0]
