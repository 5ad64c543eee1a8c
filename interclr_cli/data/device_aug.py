"""MoCo v2 augmentation split between the loader workers and the training device.

With ``data.augment_on=device`` the DataLoader workers only decode, crop (RandomResizedCrop) and
flip each view and hand over uint8 tensors; :class:`DeviceAugment` then applies the rest of the
MoCo v2 recipe (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning") to the
whole batch at once, on the GPU when there is one:

    colour jitter (brightness, contrast, saturation 0.4, hue 0.1; the four in a random order per
    image) with probability ``color_jitter_p``, grayscale with ``grayscale_p``, Gaussian blur
    (sigma ~ U[0.1, 2], the same kernel size and reflect padding as the worker path) with
    ``blur_p``, normalisation.

The operations follow torchvision's definitions on float images in [0, 1] (grayscale weights
0.2989/0.587/0.114, contrast around the mean grey level, hue through HSV); the worker path works
on 8-bit PIL images and rounds after each step, so the two agree to about one grey level. The
horizontal flip stays in the workers: it commutes with every colour operation and with the
symmetric blur.

Every parameter is drawn per image from a generator seeded by (seed, epoch, step, rank, view):
no host-device synchronisation, and a resumed run draws exactly what an uninterrupted one did.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from ..config.schema import DataConfig
from .transforms import blur_kernel_size

# ColorJitter(0.4, 0.4, 0.4, 0.1) of MoCo v2
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}
SIGMA = (0.1, 2.0)


def crop_flip_transform(cfg: DataConfig) -> T.Compose:
    """The worker half: RandomResizedCrop, horizontal flip, uint8 tensor [3, S, S]."""
    return T.Compose(
        [
            T.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_min_scale, 1.0)),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
        ]
    )


def step_seed(seed: int, epoch: int, step_in_epoch: int, rank: int, view: int) -> int:
    """A 63-bit seed that is a function of its arguments only (numpy's SeedSequence hash)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(step_in_epoch), int(rank), int(view), 0x5EED])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------- colour operations
# x: [B, 3, H, W] float in [0, 1]; f: per-image factors [B]


def _per_image(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, as torchvision and PIL: [B, 1, H, W]."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = _per_image(f)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``x * f`` per image, clamped to [0, 1] (torchvision's ``adjust_brightness``)."""
    return (x * _per_image(f)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend each image with its mean grey level by factor ``f`` (torchvision's ``adjust_contrast``)."""
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend each image with its grayscale by factor ``f`` (torchvision's ``adjust_saturation``)."""
    return _blend(x, grayscale(x), f)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5]): RGB -> HSV, h += shift, HSV -> RGB.

    Element-wise only (no reductions over the channel axis, no gathers): fast on a CPU too.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]  # [B, 1, H, W] each
    v = torch.maximum(torch.maximum(r, g), b)
    delta = v - torch.minimum(torch.minimum(r, g), b)
    sat = delta / v.clamp_min(1e-12)  # 0 where v = 0 (then delta = 0 too)
    d = torch.where(delta > 0, delta, 1.0)
    # hue in sixths of a turn, by which channel is the maximum (torchvision's order of precedence)
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(delta > 0, h, 0.0) + 6.0 * shift.view(-1, 1, 1, 1)
    # HSV -> RGB without sectors: channel c = v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n_c + h) mod 6
    k = torch.remainder(h + _HUE_N.to(x.device, x.dtype), 6.0)  # [B, 3, H, W], n = 5, 3, 1 for r, g, b
    return v - v * sat * torch.minimum(k, 4.0 - k).clamp_(0, 1)


_HUE_N = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)

_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma [B] and reflect padding (torchvision's)."""
    bsz, c, h, w = x.shape
    half = (kernel_size - 1) / 2
    taps = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B*C, k]
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, bsz * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(bsz * c, 1, kernel_size, 1), groups=bsz * c)  # vertical
    y = F.conv2d(y, k.view(bsz * c, 1, 1, kernel_size), groups=bsz * c)  # horizontal
    return y.view(bsz, c, h, w)


class DeviceAugment:
    """The device half of MoCo v2's augmentation for a batch of uint8 views [B, 3, S, S]."""

    def __init__(self, cfg: DataConfig, device: torch.device, seed: int):
        self.cfg, self.device, self.seed = cfg, torch.device(device), int(seed)
        self.kernel = blur_kernel_size(cfg.image_size)
        self.mean = torch.tensor(cfg.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std, device=self.device).view(1, 3, 1, 1)
        self.gen = torch.Generator(device=self.device)

    def _uniform(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=self.gen, device=self.device) * (hi - lo) + lo

    def _coin(self, n: int, p: float) -> torch.Tensor:
        return (torch.rand(n, generator=self.gen, device=self.device) < p).view(-1, 1, 1, 1)

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        """Per-image parameters for ``n`` views from the generator's current state.

        Every draw happens whatever the probabilities, so changing one switch does not shift the
        others. ``order[b]`` is image b's permutation of (brightness, contrast, saturation, hue).
        """
        c = self.cfg
        jitter_on, gray_on, blur_on = (
            self._coin(n, c.color_jitter_p),
            self._coin(n, c.grayscale_p),
            self._coin(n, c.blur_p),
        )
        factors = [self._uniform(n, 1 - JITTER[k], 1 + JITTER[k]) for k in ("brightness", "contrast", "saturation")]
        factors.append(self._uniform(n, -JITTER["hue"], JITTER["hue"]))
        order = torch.rand(n, 4, generator=self.gen, device=self.device).argsort(dim=1)  # [B, 4]
        sigma = self._uniform(n, *SIGMA)
        return {
            "jitter_on": jitter_on,
            "gray_on": gray_on,
            "blur_on": blur_on,
            "factors": torch.stack(factors, 1),
            "order": order,
            "sigma": sigma,
        }

    def apply(self, x: torch.Tensor, prm: dict[str, torch.Tensor]) -> torch.Tensor:
        """Jitter, grayscale and blur float views ``x`` [B, 3, H, W] in [0, 1] (not normalised)."""
        c = self.cfg
        if c.color_jitter_p > 0:
            y = x
            for slot in range(
                4
            ):  # each image runs its own order: every op on the batch, kept where it is that image's turn
                op_here = prm["order"][:, slot].view(-1, 1, 1, 1)
                y = sum(torch.where(op_here == k, op(y, prm["factors"][:, k]), 0.0) for k, op in enumerate(_OPS))
            x = torch.where(prm["jitter_on"], y, x)
        if c.grayscale_p > 0:
            x = torch.where(prm["gray_on"], grayscale(x).expand_as(x), x)
        if c.blur_p > 0:
            x = torch.where(prm["blur_on"], gaussian_blur(x, prm["sigma"], self.kernel), x)
        return x

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = self.apply(x, self.draw(x.shape[0]))
        return (x - self.mean) / self.std

    @torch.no_grad()
    def __call__(
        self, views: torch.Tensor, *, epoch: int, step_in_epoch: int, rank: int = 0, view: int = 0
    ) -> torch.Tensor:
        """Augmented, normalised float views [B, 3, H, W] on the device from cropped uint8 views."""
        if views.dtype != torch.uint8 or views.dim() != 4 or views.shape[1] != 3:
            raise ValueError(f"expected uint8 views [B, 3, H, W], got {views.dtype} {tuple(views.shape)}")
        self.gen.manual_seed(step_seed(self.seed, epoch, step_in_epoch, rank, view))
        return self._finish(views.to(self.device, non_blocking=True).float().div_(255))

    @torch.no_grad()
    def from_images(
        self, images: torch.Tensor, *, epoch: int, step_in_epoch: int, rank: int = 0, view: int = 0
    ) -> torch.Tensor:
        """The whole recipe on whole uint8 images [B, 3, H, W] already on the device (``data.in_memory``):
        RandomResizedCrop to ``image_size`` and flip too, then as :meth:`__call__`."""
        self.gen.manual_seed(step_seed(self.seed, epoch, step_in_epoch, rank, view))
        n, _, h, w = images.shape
        boxes = draw_crops(n, h, w, (self.cfg.crop_min_scale, 1.0), self.gen, self.device)
        x = crop_resize(images.float().div_(255), boxes, self.cfg.image_size).clamp_(0, 1)
        flip = torch.rand(n, generator=self.gen, device=self.device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return self._finish(x)


# ----------------------------------------------------------------------------- crop and flip on the device


def draw_crops(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    gen: torch.Generator,
    device: torch.device,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> torch.Tensor:
    """RandomResizedCrop boxes [n, 4] (x1, y1, x2, y2 in pixels) drawn as torchvision does.

    Per image: area fraction ~ U(scale), log aspect ratio ~ U(log ratio); the first of ``attempts``
    draws whose box fits is kept, and an image with none falls back to the centre crop of the
    clamped ratio. Integer sizes and offsets, as torchvision.
    """
    area = float(height * width)
    s = torch.rand(n, attempts, generator=gen, device=device) * (scale[1] - scale[0]) + scale[0]
    lo, hi = np.log(ratio[0]), np.log(ratio[1])
    r = torch.exp(torch.rand(n, attempts, generator=gen, device=device) * (hi - lo) + lo)
    w = torch.round(torch.sqrt(s * area * r))
    h = torch.round(torch.sqrt(s * area / r))
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(fits.any(dim=1), fits.float().argmax(dim=1), -1)  # first fitting attempt
    pick = first.clamp_min(0).unsqueeze(1)
    w, h = w.gather(1, pick).squeeze(1), h.gather(1, pick).squeeze(1)
    # fallback: the whole image cut to the allowed ratio, centred
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = float(width), float(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = float(round(height * ratio[1])), float(height)
    else:
        fw, fh = float(width), float(height)
    none = first < 0
    w, h = torch.where(none, fw, w), torch.where(none, fh, h)
    u = torch.rand(n, 2, generator=gen, device=device)
    y1 = torch.floor(u[:, 0] * (height - h + 1))
    x1 = torch.floor(u[:, 1] * (width - w + 1))
    y1 = torch.where(none, torch.floor((height - h) / 2), y1)
    x1 = torch.where(none, torch.floor((width - w) / 2), x1)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``boxes`` [B, 4] out of float images [B, C, H, W] and resize each to ``size`` x ``size``.

    ``roi_align`` with pixel-aligned boxes: bilinear sampling at each output pixel's centre,
    averaged over ceil(box / size) samples per output pixel when shrinking (a box antialiasing
    filter, where torchvision's antialiased resize uses a triangle), and reading the pixels just
    outside the box at its edges (torchvision crops first). The mean difference from torchvision's
    ``resized_crop`` on CIFAR images stays below 0.03 of the range (tests/test_device_aug.py);
    measurements: benchmarks/README.md, section "Device crop-resize against torchvision".
    """
    from torchvision.ops import roi_align

    rois = torch.cat(
        [torch.arange(len(boxes), device=boxes.device, dtype=images.dtype)[:, None], boxes.to(images.dtype)], dim=1
    )
    return roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
