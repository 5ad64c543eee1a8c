"""Backbones: the exact 1x1-output convolution fast path and where it is (not) used."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn

from interclr_cli.models import Encoder, PointOutputConv2d, build_backbone, torchvision_resnet, use_point_output_convs

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(k, s, p, bias):
    torch.manual_seed(0)
    ref = nn.Conv2d(4, 6, k, stride=s, padding=p, bias=bias).double()
    fast = PointOutputConv2d(4, 6, k, stride=s, padding=p, bias=bias).double()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize(
    "h,w,k,s,p",
    [
        (1, 1, 3, 1, 1),  # ResNet layer4 at 32 px: 3x3 conv over a 1x1 map (only the centre tap is real)
        (2, 2, 3, 2, 1),  # layer4's first conv: 2x2 -> 1x1, stride 2
        (2, 2, 1, 2, 0),  # its 1x1 stride-2 shortcut
        (3, 4, 3, 2, 0),  # unpadded, rectangular, the last column outside the window
        (1, 2, 5, 3, 2),  # padding larger than the map on one side
    ],
)
def test_point_output_conv_equals_conv2d_with_gradients(h, w, k, s, p):
    ref, fast = _pair(k, s, p, bias=True)
    x = torch.randn(3, 4, h, w, dtype=torch.double, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    assert fast._window(x2) is not None  # the fast path is taken for these shapes
    y_ref, y_fast = ref(x), fast(x2)
    assert y_fast.shape == y_ref.shape == (3, 6, 1, 1)
    torch.testing.assert_close(y_fast, y_ref, rtol=0, atol=1e-12)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y_fast.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=0, atol=1e-12)  # padding taps: zero
    torch.testing.assert_close(fast.bias.grad, ref.bias.grad, rtol=0, atol=1e-12)


def test_point_output_conv_defers_to_conv2d_for_larger_outputs():
    for h, k, s, p in itertools.product([2, 4, 7], [1, 3], [1, 2], [0, 1]):
        if h + 2 * p < k:
            continue
        ref, fast = _pair(k, s, p, bias=False)
        x = torch.randn(2, 4, h, h, dtype=torch.double)
        if (h + 2 * p - k) // s + 1 > 1:
            assert fast._window(x) is None
        torch.testing.assert_close(fast(x), ref(x), rtol=0, atol=1e-12)


def test_encoder_uses_fast_path_with_torchvision_names_and_same_results():
    torch.manual_seed(0)
    enc = Encoder("resnet18", small_stem=False, hidden=64, embed_dim=16)
    convs = [m for m in enc.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is PointOutputConv2d for m in convs)
    # the names (and shapes) stay torchvision's: the state dict loads strictly into the plain model
    plain = torchvision_resnet("resnet18")
    plain.fc = nn.Identity()
    plain.load_state_dict(enc.backbone.state_dict(), strict=True)
    enc.eval(), plain.eval()
    x = torch.randn(4, 3, 32, 32)  # layer4 sees 1x1 maps here: the fast path is exercised
    torch.testing.assert_close(enc.backbone(x), plain(x), rtol=1e-4, atol=1e-5)
    # deepcopy (the momentum key encoder) keeps the class
    assert type(copy.deepcopy(enc).backbone.layer4[0].conv1) is PointOutputConv2d


def test_exported_and_downstream_backbones_stay_plain_conv2d():
    bb, _ = build_backbone("resnet18")
    assert all(type(m) is nn.Conv2d for m in bb.modules() if isinstance(m, nn.Conv2d))
    fast = use_point_output_convs(copy.deepcopy(bb))
    assert sum(type(m) is PointOutputConv2d for m in fast.modules()) == sum(
        isinstance(m, nn.Conv2d) for m in bb.modules()
    )
