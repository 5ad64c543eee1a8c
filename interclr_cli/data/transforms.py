"""Image transforms: MoCo v2 augmentation, evaluation and linear-probe training.

All randomness comes from torch's global RNG (torchvision v1 transforms), so
:class:`~interclr_cli.data.datasets.ImageDataset` can make it a pure function of a seed.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import correlate1d
from torchvision import transforms as T

from ..config.schema import DataConfig

log = logging.getLogger("interclr.data")

# Below this size the linear probe uses CIFAR-style padded random crops.
SMALL_IMAGE = 64


def _normalize(cfg: DataConfig) -> list:
    return [T.ToTensor(), T.Normalize(mean=list(cfg.mean), std=list(cfg.std))]


def blur_kernel_size(image_size: int) -> int:
    """About 10% of the image size, odd, at least 3 (23 for 224)."""
    k = max(3, int(0.1 * image_size))
    return k if k % 2 else k + 1


class GaussianBlur:
    """Blur a PIL image with a ``kernel_size``-tap Gaussian, sigma ~ U(sigma) from torch's RNG.

    Same kernel, sigma draw and reflect padding as torchvision's ``GaussianBlur`` (results agree
    to +-1 grey level), but a separable scipy filter, which is faster on CPU, where torch's conv
    pays a large per-call cost on small images (measurements: benchmarks/README.md, section
    "Worker Gaussian blur").
    """

    def __init__(self, kernel_size: int, sigma: tuple[float, float] = (0.1, 2.0)):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.kernel_size = kernel_size
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        half = (self.kernel_size - 1) / 2
        x = np.linspace(-half, half, self.kernel_size, dtype=np.float32)
        w = np.exp(-0.5 * (x / sigma) ** 2)
        w /= w.sum()
        a = np.asarray(img, dtype=np.float32)
        a = correlate1d(a, w, axis=0, mode="mirror")  # mirror = torch's "reflect" padding
        a = correlate1d(a, w, axis=1, mode="mirror")
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), img.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kernel_size={self.kernel_size}, sigma={self.sigma})"


def moco_v2_transform(cfg: DataConfig) -> T.Compose:
    """One MoCo v2 view: crop, colour jitter, grayscale, Gaussian blur, flip, normalise."""
    return T.Compose(
        [
            T.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_min_scale, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=cfg.color_jitter_p),
            T.RandomGrayscale(p=cfg.grayscale_p),
            T.RandomApply([GaussianBlur(blur_kernel_size(cfg.image_size), sigma=(0.1, 2.0))], p=cfg.blur_p),
            T.RandomHorizontalFlip(),
            *_normalize(cfg),
        ]
    )


def eval_transform(cfg: DataConfig) -> T.Compose:
    """Resize the short side to ``eval_resize`` (at least ``image_size``), centre-crop, normalise."""
    resize = max(cfg.eval_resize, cfg.image_size)
    if resize > 2 * cfg.image_size:
        log.warning(
            "data.eval_resize=%d is over twice data.image_size=%d, so evaluation sees a small centre "
            "patch; set data.eval_resize=%d or lower",
            cfg.eval_resize,
            cfg.image_size,
            cfg.image_size,
        )
    return T.Compose([T.Resize(resize), T.CenterCrop(cfg.image_size), *_normalize(cfg)])


def linear_train_transform(cfg: DataConfig) -> T.Compose:
    """Linear-probe training: random-resized crop and flip; padded random crop for small images."""
    if cfg.image_size <= SMALL_IMAGE:
        head = [T.Resize(cfg.image_size), T.RandomCrop(cfg.image_size, padding=4)]
    else:
        head = [T.RandomResizedCrop(cfg.image_size)]
    return T.Compose([*head, T.RandomHorizontalFlip(), *_normalize(cfg)])
