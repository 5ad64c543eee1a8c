"""Random draws from an explicit ``torch.Generator``, placed on the tensors' device.

The numbers are drawn on the generator's own device and then moved, so a CPU generator gives
the same numbers whatever device the data lives on, and a CUDA generator keeps everything on
the GPU. ``generator=None`` uses the global RNG of ``device``.
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
