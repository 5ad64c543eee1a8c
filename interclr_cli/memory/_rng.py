"""Random draws from an explicit ``torch.Generator``, placed on the tensors' device.

The numbers are drawn on the generator's own device and then moved, so a CPU generator gives
the same numbers whatever device the data lives on, and a CUDA generator keeps everything on
the GPU. ``generator=None`` uses the global RNG of ``device``. :func:`step_seed` derives a
per-step seed in pure Python (no tensor, so nothing to read back from a device and no state to save).
"""

from __future__ import annotations

from typing import Optional

import torch


def rand(shape, generator: Optional[torch.Generator], device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) of ``shape`` on ``device``."""
    gdev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gdev, dtype=dtype).to(device)


def randint(high: int, shape, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """Uniform integers in [0, high) of ``shape`` (int64) on ``device``."""
    gdev = generator.device if generator is not None else device
    return torch.randint(0, high, shape, generator=generator, device=gdev).to(device)


_MASK64 = (1 << 64) - 1


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed for ``(seed, step, stream)``: the SplitMix64 finaliser of their mix, so nearby
    steps or streams (e.g. ranks) give unrelated seeds. Pure Python: a step calls it without
    touching a tensor, and a resumed run recomputes it from the step number."""
    x = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9 + (stream + 1) * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1
