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

Each colour op runs once per image, each image in its own order, with fixed shapes
(:func:`color_jitter`). With ``data.in_memory`` or ``data.decode=device`` the crop and flip run
here too (:meth:`DeviceAugment.from_images`: torchvision's RandomResizedCrop boxes per image,
:func:`crop_resize` as two batched matrix products).

Every parameter is drawn per image from a generator seeded by (seed, epoch, step, rank, view):
no host-device synchronisation, and a resumed run draws exactly what an uninterrupted one did.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from ..config.schema import DataConfig
from ..runtime.device import host_to_device
from .samplers import hashed_seed
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
    """A 63-bit seed that is a function of its arguments only (:func:`~.samplers.hashed_seed`)."""
    return hashed_seed(seed, epoch, step_in_epoch, rank, view, 0x5EED)


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


def adjust_hue(x: torch.Tensor, shift: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5]): RGB -> HSV, h += shift, HSV -> RGB.

    Element-wise only (no reductions over the channel axis, no gathers): fast on a CPU too.
    ``offsets``: :data:`HUE_OFFSETS` already on ``x``'s device and dtype (:class:`DeviceAugment`
    keeps one there, so a step copies nothing from the host); by default it is moved per call.
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
    n = HUE_OFFSETS.to(x.device, x.dtype) if offsets is None else offsets
    k = torch.remainder(h + n, 6.0)  # [B, 3, H, W], n = 5, 3, 1 for r, g, b
    return v - v * sat * torch.minimum(k, 4.0 - k).clamp_(0, 1)


# n_c of the HSV -> RGB formula for r, g, b: [1, 3, 1, 1]
HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)

_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
HUE = 3  # the index of adjust_hue in _OPS (and in ``order`` / ``factors``)


def _blend_pass(x: torch.Tensor, op: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """One of brightness (op 0), contrast (1), saturation (2) per image, as one blend [B, 3, H, W].

    All three are ``clamp(f * x + (1 - f) * other)`` with ``other`` = 0, the mean grey level or
    the grey image: ``other = [op == 2] * gray + [op == 1] * mean(gray)``. ``f = 1`` leaves an
    image exactly as it is (``1 * x + 0 * other``), which is how an image sits out a pass.
    """
    gray = grayscale(x)  # [B, 1, H, W]
    f = _per_image(f)
    sat, con = _per_image((op == 2).to(x.dtype)) * (1 - f), _per_image((op == 1).to(x.dtype)) * (1 - f)
    rest = torch.addcmul(gray.mean(dim=(1, 2, 3), keepdim=True) * con, gray, sat)  # (1 - f) * other [B, 1, H, W]
    return torch.addcmul(rest, x, f).clamp_(0, 1)


def color_jitter(
    x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, hue_offsets: torch.Tensor
) -> torch.Tensor:
    """torchvision's ``ColorJitter`` with each image's own factors [B, 4] and op order [B, 4].

    Each op runs once per image, with shapes fixed (no host syncs): image b's order is its three
    blend ops ``seq_b`` (order without hue) with the hue after the first ``k_b`` of them. Blend
    pass p of the first phase applies ``seq_b[p]`` where ``p < k_b``, then the hue runs on every
    image once, then blend pass p of the second phase applies ``seq_b[p]`` where ``p >= k_b``;
    an image sits out a pass with factor 1 (an exact identity).
    """
    k = (order == HUE).to(torch.int64).argmax(dim=1, keepdim=True)  # [B, 1] hue's slot
    # seq: the order without the hue, [B, 3] (the slots after k shift down by one)
    slots = torch.arange(3, device=order.device).unsqueeze(0)  # [1, 3]
    seq = order.gather(1, slots + (slots >= k).to(torch.int64))  # [B, 3]
    f_seq = factors.gather(1, seq)  # [B, 3]
    one = torch.ones_like(f_seq)
    first = slots < k  # [B, 3]: pass p runs before the hue
    for p in range(3):
        x = _blend_pass(x, seq[:, p], torch.where(first[:, p], f_seq[:, p], one[:, p]))
    x = adjust_hue(x, factors[:, HUE], hue_offsets)
    for p in range(3):
        x = _blend_pass(x, seq[:, p], torch.where(first[:, p], one[:, p], f_seq[:, p]))
    return x


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


# On the CPU the colour ops run over blocks of images of about this many bytes of float views
# (8 images at 224 px, a whole batch at 32 px), so that the ~80 element-wise ops of a view work in
# the cache instead of streaming the batch through memory each time: one core, B=64, 224 px, 2.5-3x
# faster than the whole batch at once (benchmarks/README.md, "Device colour ops in cache-sized
# blocks"). A GPU takes the whole batch in one go.
CPU_BLOCK_BYTES = 5 << 20


class DeviceAugment:
    """The device half of MoCo v2's augmentation for a batch of uint8 views [B, 3, S, S]."""

    def __init__(self, cfg: DataConfig, device: torch.device, seed: int):
        self.cfg, self.device, self.seed = cfg, torch.device(device), int(seed)
        self.kernel = blur_kernel_size(cfg.image_size)
        self.mean = torch.tensor(cfg.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std, device=self.device).view(1, 3, 1, 1)
        self.hue_offsets = HUE_OFFSETS.to(self.device)  # once, not per view
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
        if c.color_jitter_p > 0:  # each image in its own order, each op once per image
            y = color_jitter(x, prm["factors"], prm["order"], self.hue_offsets)
            x = torch.where(prm["jitter_on"], y, x)
        if c.grayscale_p > 0:
            x = torch.where(prm["gray_on"], grayscale(x).expand_as(x), x)
        if c.blur_p > 0:
            x = torch.where(prm["blur_on"], gaussian_blur(x, prm["sigma"], self.kernel), x)
        return x

    def block(self, x: torch.Tensor) -> int:
        """Images per block of :meth:`_finish`: the whole batch on a GPU; on the CPU as many as
        fit in :data:`CPU_BLOCK_BYTES` (at least one)."""
        if self.device.type != "cpu":
            return x.shape[0]
        return max(1, CPU_BLOCK_BYTES // (x[0].numel() * x.element_size()))

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """Draw the batch's parameters at once, then apply and normalise block by block, in place
        in ``x`` (a tensor of its own). The draws do not depend on the blocks, so the result is
        the same for every block size."""
        prm, n, step = self.draw(x.shape[0]), x.shape[0], self.block(x)
        for s in range(0, n, step):  # one block on a GPU; cache-sized blocks of images on the CPU
            part = {k: v[s : s + step] for k, v in prm.items()}
            x[s : s + step] = self.apply(x[s : s + step], part).sub_(self.mean).div_(self.std)
        return x

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
        self, images: torch.Tensor | PaddedImages, *, epoch: int, step_in_epoch: int, rank: int = 0, view: int = 0
    ) -> torch.Tensor:
        """The whole recipe on whole uint8 images already on the device: RandomResizedCrop to
        ``image_size`` and flip too, then as :meth:`__call__`. ``images``: [B, 3, H, W] of one size
        (``data.in_memory``) or a :class:`PaddedImages` of several sizes (``data.decode=device``);
        a batch of one size gets the same views either way (to float rounding)."""
        self.gen.manual_seed(step_seed(self.seed, epoch, step_in_epoch, rank, view))
        scale, size = (self.cfg.crop_min_scale, 1.0), self.cfg.image_size
        padded = isinstance(images, PaddedImages)
        n = images.count if padded else images.shape[0]
        h, w = (images.sizes[:, 0], images.sizes[:, 1]) if padded else images.shape[2:]
        boxes = draw_crops(n, h, w, scale, self.gen, self.device)
        flip = torch.rand(n, generator=self.gen, device=self.device) < 0.5
        if padded:
            x = images.crop_resize(boxes, size, flip)
        else:
            x = crop_resize(images.float().div_(255), boxes, size, flip)
        return self._finish(x.clamp_(0, 1))


# ----------------------------------------------------------------------------- crop and flip on the device


def draw_crops(
    n: int,
    height: int | torch.Tensor,
    width: int | torch.Tensor,
    scale: tuple[float, float],
    gen: torch.Generator,
    device: torch.device,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> torch.Tensor:
    """RandomResizedCrop boxes [n, 4] (x1, y1, x2, y2 in pixels) drawn as torchvision does.

    ``height`` and ``width``: one image size, or each image's (float tensors [n] on ``device``).
    Per image: area fraction ~ U(scale), log aspect ratio ~ U(log ratio); the first of ``attempts``
    draws whose box fits is kept, and an image with none falls back to the centre crop of the
    clamped ratio. Integer sizes and offsets, as torchvision. The draws do not depend on the
    sizes, so a batch of one size gets the same boxes either way.
    """
    hgt, wid = (
        v.to(torch.float32) if isinstance(v, torch.Tensor) else torch.full((n,), float(v), device=device)
        for v in (height, width)
    )  # [n] each
    area = (hgt * wid).unsqueeze(1)  # [n, 1]
    s = torch.rand(n, attempts, generator=gen, device=device) * (scale[1] - scale[0]) + scale[0]
    lo, hi = np.log(ratio[0]), np.log(ratio[1])
    r = torch.exp(torch.rand(n, attempts, generator=gen, device=device) * (hi - lo) + lo)
    w = torch.round(torch.sqrt(s * area * r))
    h = torch.round(torch.sqrt(s * area / r))
    fits = (w > 0) & (h > 0) & (w <= wid.unsqueeze(1)) & (h <= hgt.unsqueeze(1))
    first = torch.where(fits.any(dim=1), fits.float().argmax(dim=1), -1)  # first fitting attempt
    pick = first.clamp_min(0).unsqueeze(1)
    w, h = w.gather(1, pick).squeeze(1), h.gather(1, pick).squeeze(1)
    # fallback: the whole image cut to the allowed ratio, centred
    in_ratio = wid / hgt
    fw = torch.where(in_ratio > ratio[1], torch.round(hgt * ratio[1]), wid)
    fh = torch.where(in_ratio < ratio[0], torch.round(wid / ratio[0]), hgt)
    none = first < 0
    w, h = torch.where(none, fw, w), torch.where(none, fh, h)
    u = torch.rand(n, 2, generator=gen, device=device)
    y1 = torch.floor(u[:, 0] * (hgt - h + 1))
    x1 = torch.floor(u[:, 1] * (wid - w + 1))
    y1 = torch.where(none, torch.floor((hgt - h) / 2), y1)
    x1 = torch.where(none, torch.floor((wid - w) / 2), x1)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def resize_weights(lo: torch.Tensor, hi: torch.Tensor, n: int, size: int, bounds=None) -> torch.Tensor:
    """Interpolation matrices [B, size, n]: row i weighs the source pixels for output pixel i when
    the span [lo, hi) (pixels, [B]) of an axis of length ``n`` is resized to ``size``.

    PIL's and torchvision's antialiased bilinear filter: a triangle of radius ``max(scale, 1)``
    source pixels (scale = source pixels per output pixel) around the output pixel's centre
    ``lo + (i + 0.5) * scale``, over the pixels whose centre lies in ``bounds`` ([B, 2], default
    the span itself: torchvision crops first), each row normalised to sum 1.
    """
    scale = (hi - lo) / size  # [B]
    radius = scale.clamp_min(1.0).view(-1, 1, 1)
    out = torch.arange(size, device=lo.device, dtype=torch.float32) + 0.5
    centre = (lo.view(-1, 1) + out * scale.view(-1, 1)).unsqueeze(2)  # [B, size, 1]
    src = torch.arange(n, device=lo.device, dtype=torch.float32) + 0.5  # pixel centres [n]
    w = (1 - (src - centre).abs() / radius).clamp_min_(0)  # [B, size, n]
    a, b = (lo, hi) if bounds is None else (bounds[:, 0], bounds[:, 1])
    w = w * ((src >= a.view(-1, 1)) & (src < b.view(-1, 1))).unsqueeze(1)
    return w / w.sum(dim=2, keepdim=True).clamp_min_(1e-12)


def crop_resize(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size: int,
    flip: torch.Tensor | None = None,
    bounds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop ``boxes`` [B, 4] (x1, y1, x2, y2 in pixels) out of float images [B, C, H, W] and resize
    each to ``size`` x ``size``: ``Wy @ image @ Wx^T`` with each image's :func:`resize_weights`
    (two batched matrix products), mirrored where ``flip`` [B] (bool) is set.

    The filter is torchvision's antialiased bilinear one, reading only pixels inside the box (or
    ``bounds`` [B, 4], same layout), so padding beyond an image is never read. The mean difference
    from torchvision's ``resized_crop`` on CIFAR images stays below 0.03 of the range
    (tests/test_device_aug.py); measurements: benchmarks/README.md, section "Device crop-resize
    against torchvision".
    """
    _, _, h, w = images.shape
    by = None if bounds is None else bounds[:, 1::2]
    bx = None if bounds is None else bounds[:, 0::2]
    wy = resize_weights(boxes[:, 1], boxes[:, 3], h, size, by)  # [B, size, H]
    wx = resize_weights(boxes[:, 0], boxes[:, 2], w, size, bx)  # [B, size, W]
    if flip is not None:
        wx = torch.where(flip.view(-1, 1, 1), wx.flip(1), wx)
    rows = torch.matmul(wy.unsqueeze(1).to(images.dtype), images)  # [B, C, size, W]
    return torch.matmul(rows, wx.transpose(1, 2).unsqueeze(1).to(images.dtype))  # [B, C, size, size]


class PaddedImages:
    """A batch of uint8 images [3, h_i, w_i] of several sizes, on the device, for :func:`crop_resize`.

    The images are pasted into zero canvases [b, 3, H, W] (H, W: the largest size in the canvas);
    :func:`crop_resize` reads only the pixels inside a box, so a box gives what it gives in a
    tensor of that image alone. Images are sorted by size into canvases of at most ``budget``
    elements each (one huge image does not make every canvas huge); ``sizes`` [B, 2] (h, w as
    floats, on the device) and ``hw`` (the same on the host) stay in batch order.
    """

    def __init__(self, images: list[torch.Tensor], device: torch.device, budget: int = 1 << 27):
        self.count, self.device = len(images), torch.device(device)
        self.hw = hw = [tuple(im.shape[1:]) for im in images]  # (h, w) per image: host metadata, no sync
        self.sizes = host_to_device(torch.tensor(hw, dtype=torch.float32).view(-1, 2), self.device)
        self.chunks: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        order = sorted(range(self.count), key=lambda i: hw[i][0] * hw[i][1])
        start = 0
        while start < self.count:
            end, hmax, wmax = start, 0, 0
            while end < self.count:
                h, w = max(hmax, hw[order[end]][0]), max(wmax, hw[order[end]][1])
                if end > start and (end - start + 1) * 3 * h * w > budget:
                    break
                end, hmax, wmax = end + 1, h, w
            self.chunks.append(self._canvas([images[i] for i in order[start:end]], hmax, wmax, order[start:end]))
            start = end

    def _canvas(self, images: list[torch.Tensor], hmax: int, wmax: int, rows: list[int]):
        canvas = torch.zeros(len(images), 3, hmax, wmax, dtype=torch.uint8, device=self.device)
        for b, im in enumerate(images):  # assembling the batch: one copy per image, as a collate does
            canvas[b, :, : im.shape[1], : im.shape[2]].copy_(im, non_blocking=True)
        whole = rows == list(range(self.count))
        return canvas, None if whole else host_to_device(torch.tensor(rows, dtype=torch.int64), self.device)

    def crop_resize(self, boxes: torch.Tensor, size: int, flip=None, bounds=None) -> torch.Tensor:
        """:func:`crop_resize` of every image's box [B, 4] (``flip`` [B], ``bounds`` [B, 4] optional),
        as floats in [0, 1]: [B, 3, size, size]."""
        if len(self.chunks) == 1 and self.chunks[0][1] is None:
            return crop_resize(self.chunks[0][0].float().div_(255), boxes, size, flip, bounds)
        out = torch.empty(self.count, 3, size, size, device=self.device)
        for canvas, rows in self.chunks:
            pick = [None if t is None else t.index_select(0, rows) for t in (boxes, flip, bounds)]
            out.index_copy_(0, rows, crop_resize(canvas.float().div_(255), pick[0], size, *pick[1:]))
        return out
