"""Convolutions with a single output position, computed as one matrix product.

A ResNet fed small images ends with 1x1 feature maps: at 32 px with the standard stem, the four
3x3 convolutions of ``layer4`` see a 2x2 or 1x1 input and give a 1x1 output. oneDNN's CPU
backward for such a convolution is pathologically slow, many times its forward (measurements:
benchmarks/README.md, section "1x1-output convolutions").

When the output is 1x1 the convolution is exactly a linear map of the input window under the
kernel: output[b, o] = sum_{c,i,j} w[o, c, i, j] * x_pad[b, c, i, j]. Taps that fall on the zero
padding contribute nothing and get a zero gradient, so only the taps over real pixels enter the
product. :class:`PointOutputConv2d` does that and defers to ``nn.Conv2d`` for every other shape;
parameters, names and state dicts are unchanged (it is the same module with another forward).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PointOutputConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose 1x1-output case is a ``F.linear`` over the taps that cover the input."""

    def _window(self, x: torch.Tensor) -> tuple[slice, slice, slice, slice] | None:
        if not isinstance(self.padding, tuple) or self.padding_mode != "zeros":
            return None
        if self.groups != 1 or self.dilation != (1, 1):
            return None
        (h, w), (kh, kw), (ph, pw), (sh, sw) = x.shape[-2:], self.kernel_size, self.padding, self.stride
        if (h + 2 * ph - kh) // sh != 0 or (w + 2 * pw - kw) // sw != 0 or ph >= kh or pw >= kw:
            return None  # more than one output position (or a window entirely over the padding)
        # the one output sees padded rows 0..kh-1, i.e. input rows -ph..kh-1-ph: taps ph..ph+h-1 are real
        th, tw = min(kh, h + ph), min(kw, w + pw)
        return slice(0, th - ph), slice(0, tw - pw), slice(ph, th), slice(pw, tw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        win = self._window(x) if x.dim() == 4 else None
        if win is None:
            return super().forward(x)
        xr, xc, wr, wc = win
        xs = x[:, :, xr, xc].reshape(x.shape[0], -1)  # [B, C*h'*w']
        ws = self.weight[:, :, wr, wc].reshape(self.out_channels, -1)  # [O, C*h'*w'], same (c, i, j) order
        return F.linear(xs, ws, self.bias)[:, :, None, None]  # [B, O, 1, 1]


def use_point_output_convs(model: nn.Module) -> nn.Module:
    """Give every plain ``nn.Conv2d`` of ``model`` the 1x1-output fast path, in place.

    Only the module's class changes (parameters, buffers and their names stay), so checkpoints,
    DDP, SyncBN conversion and ``deepcopy`` are unaffected. Not used for exported models, which
    stay plain torchvision modules.
    """
    for m in model.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = PointOutputConv2d
    return model
