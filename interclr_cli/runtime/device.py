"""Device, precision and memory-format selection with clean CPU fall-backs."""

from __future__ import annotations

import contextlib
import logging

import torch

from ..errors import UserError

log = logging.getLogger("interclr")


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU (with a warning that it will be slow)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        log.warning("no GPU found: running on the CPU, which will be slow (set device=cpu to silence this)")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={name} but no CUDA GPU is visible; use device=auto or device=cpu")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(
                f"device={name} but only {torch.cuda.device_count()} GPU(s) are visible; use cuda:0..{torch.cuda.device_count() - 1}"
            )
        return dev
    return torch.device("cpu")


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA or CPU (both supported by torch); a no-op for ``none``."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(channels_last: bool) -> torch.memory_format:
    """``torch.channels_last`` when asked for, else ``torch.contiguous_format``."""
    return torch.channels_last if channels_last else torch.contiguous_format


def process_device(name: str) -> torch.device:
    """:func:`select_device` for this process: under a distributed launch with GPUs every rank
    uses its own GPU (``LOCAL_RANK``, set up by :func:`~interclr_cli.runtime.launch.init_distributed`),
    whatever ``cuda:N`` the config names (with a warning)."""
    from . import dist

    device = select_device(name)
    if dist.is_dist() and device.type == "cuda" and device.index not in (None, torch.cuda.current_device()):
        log.warning(
            f"device={name} ignored under a distributed launch: rank {dist.rank()} uses its own GPU (LOCAL_RANK)"
        )
        device = torch.device("cuda", torch.cuda.current_device())
    return device
