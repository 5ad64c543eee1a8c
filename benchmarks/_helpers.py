"""Helpers shared by the benchmark scripts (not part of the interclr package)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


@torch.no_grad()
def random_init_state(method) -> None:
    """Give an InterCLR ``method`` random unit bank rows and balanced random labels, without the
    extraction + k-means pass of ``on_train_start`` (the per-step cost does not depend on the
    values). Seeded by ``method.cfg.seed``; sets ``labels_epoch`` to 0."""
    g = torch.Generator().manual_seed(method.cfg.seed)
    features = method.bank.features
    n, d = features.shape
    for s in range(0, n, 1 << 18):
        rows = F.normalize(torch.randn(min(1 << 18, n - s), d, generator=g), dim=1)
        features[s : s + rows.shape[0]] = rows.to(features)
    labels = torch.arange(n)[torch.randperm(n, generator=g)] % method.num_clusters
    method.labels.init(labels.to(features.device), features)
    method.labels_epoch.fill_(0)


def bytes_written() -> Optional[int]:
    """Bytes this process has passed to write-like system calls so far (``wchar`` of
    /proc/self/io, which counts socket sends: the collectives' traffic under gloo), or None."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
