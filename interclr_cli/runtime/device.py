"""Device, precision and memory-format selection with clean CPU fall-backs."""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess

import torch

from ..errors import UserError

log = logging.getLogger("interclr")


def nvidia_smi_gpus() -> int:
    """How many GPUs ``nvidia-smi -L`` lists (0 without the tool, or when it fails)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def _unusable_gpu_error(gpus: int) -> UserError:
    """nvidia-smi sees GPUs that this torch cannot use: say which torch it is and what to do."""
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return UserError(
        f"nvidia-smi lists {gpus} GPU(s) but torch {torch.__version__} ({build}) cannot use them "
        "(a CPU-only torch, or a CUDA build newer than the driver: compare `nvidia-smi` with torch.version.cuda); "
        "install the torch build for your driver (https://pytorch.org/get-started/locally/), "
        "or set device=cpu to train on the CPU"
    )


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU (with a warning that it will be slow); a
    one-line error instead when ``nvidia-smi`` lists GPUs that torch cannot use (a long run must not
    start on the CPU by accident)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        gpus = nvidia_smi_gpus()
        if gpus:
            raise _unusable_gpu_error(gpus)
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


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``: through pinned memory and asynchronously on CUDA (a
    pageable copy would wait for the stream); a plain ``.to`` elsewhere."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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
