"""BatchNorm in G groups of one batch: G devices' statistics emulated on one device.

MoCo (He et al., arXiv 1911.05722, Sec. 3.3) shows that per-device BatchNorm lets a query and
its key share batch statistics, which leaks the positive; on several GPUs the key batch is
shuffled across devices ("shuffle-BN"). On one device MoCo's CIFAR demo splits the batch into G
groups in both encoders and shuffles the key batch before its forward, so the key of an image
is normalised with a different random set of images than its query, as on G devices.

``SplitBatchNorm2d`` in training mode, for x [N, C, H, W] with N divisible by G:

    group(n) = n mod G                                        sample n's group
    y_n = (x_n - mu_g) / sqrt(var_g + eps) * w + b            mu_g, var_g over group g's
                                                              N/G samples and H x W
    running stats: the mean over the G groups of each group's momentum update

(one ``F.batch_norm`` over the view [N/G, G*C, H, W], so the fused kernels do the work). A batch
that ``groups`` does not suit takes :func:`split_groups` of its size. In evaluation mode, or with
G = 1, it is ``nn.BatchNorm2d``. Parameter and buffer names are
BatchNorm's, so checkpoints and exports are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Each group keeps at least this many images when the batch allows (BatchNorm over fewer is noisy).
MIN_GROUP = 16


def split_groups(batch: int, groups: int) -> int:
    """G actually used for a per-process ``batch``: the largest divisor of ``batch`` that is at most
    ``groups`` and leaves >= MIN_GROUP images per group. 1 (plain BatchNorm) when ``groups <= 1``
    or the batch is under 2 x MIN_GROUP: statistics of a handful of images are too noisy to train
    with (and can turn the loss non-finite), so such small batches keep the leak instead."""
    for g in range(min(groups, batch // MIN_GROUP), 1, -1):
        if batch % g == 0:
            return g
    return 1


class SplitBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics are per group of ``groups`` (module doc)."""

    groups: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = split_groups(n, self.groups) if self.training else 1  # a smaller batch: fewer groups
        if g <= 1:
            return super().forward(x)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = 0.1 if self.momentum is None else self.momentum
        mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)  # [G*C]
        weight = self.weight.repeat(g) if self.affine else None
        bias = self.bias.repeat(g) if self.affine else None
        # [N, C, H, W] -> [N/G, G*C, H, W]: channel block j holds the samples n with n mod G = j
        y = F.batch_norm(x.reshape(n // g, g * c, h, w), mean, var, weight, bias, True, momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(g, c).mean(0))
            self.running_var.copy_(var.view(g, c).mean(0))
        return y.reshape(n, c, h, w)


def split_batchnorm(module: nn.Module, groups: int) -> nn.Module:
    """Turn every ``nn.BatchNorm2d`` of ``module`` into a :class:`SplitBatchNorm2d` of ``groups``
    (in place, same tensors); returns ``module``."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.__class__ = SplitBatchNorm2d  # a subclass without new state: same tensors, same names
            m.groups = int(groups)
    return module


__all__ = ["MIN_GROUP", "SplitBatchNorm2d", "split_batchnorm", "split_groups"]
