"""``data.decode=device``: the workers read file bytes, the training process decodes on the device.

The DataLoader workers only read each file (:func:`read_encoded`): a JPEG stays its encoded
bytes, a 1-D uint8 tensor; any other format is decoded with PIL in the worker (the fallback for
formats the device decoder does not read) into uint8 pixels [3, h, w]. :class:`DeviceDecodedBatches`
then decodes a batch's JPEGs at once with ``torchvision.io.decode_jpeg(..., device=)`` (nvjpeg on
CUDA, libjpeg-turbo on the CPU: the same pixels as PIL there), grey and CMYK files converted to
RGB, and hands the step a :class:`~interclr_cli.data.device_aug.PaddedImages`, from which
:meth:`DeviceAugment.from_images` crops, resizes, flips and colours each view on the device.

Skipped images, as with PIL workers: a file that cannot be read or decoded is reported once and
counted in the batch's ``skipped``. A JPEG the device decoder rejects gets a second chance with
PIL in the training process (then it is moved to the device); only if that fails too is it
skipped. With ``substitute`` (several ranks, whose batches must keep one size), a row the
training process could not decode is served by the next decoded row of the batch instead.
"""

from __future__ import annotations

import io
import warnings
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..runtime.device import host_to_device
from .datasets import ImageDataset, load_rgb, split_skipped, warn_unreadable
from .device_aug import PaddedImages
from .loader import loader_from_config

JPEG_MAGIC = b"\xff\xd8\xff"


def read_encoded(path: str) -> Optional[torch.Tensor]:
    """The worker's share: a JPEG's bytes (uint8 [n]), another format's RGB pixels (uint8 [3, h, w]
    through PIL), or None (reported once) when the file cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        warn_unreadable(path, e)
        return None
    if data.startswith(JPEG_MAGIC):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    img = load_rgb(path)
    return None if img is None else torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def unchanged(x):
    """The identity transform (what the workers do to the bytes they read)."""
    return x


def collate_encoded(samples: list[Optional[dict]]) -> dict:
    """Like :func:`~interclr_cli.data.datasets.collate_skip`, but ``encoded`` stays a list (the
    items differ in length): ``{"encoded": [tensor, ...], "index", "label", "skipped"}``."""
    kept, skipped = split_skipped(samples)
    return {
        "encoded": [s["image"] for s in kept],
        "index": torch.tensor([s["index"] for s in kept], dtype=torch.int64),
        "label": torch.tensor([s["label"] for s in kept], dtype=torch.int64),
        "skipped": skipped,
    }


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[Optional[torch.Tensor]]:
    """Decode JPEG byte tensors to RGB uint8 [3, h, w] on ``device``, batched; None where it fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*decod")
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad file fails the whole call: decode one by one to find it
            out: list[Optional[torch.Tensor]] = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def _decode_pil(data: torch.Tensor) -> Optional[torch.Tensor]:
    """PIL's decoding of encoded bytes as RGB uint8 [3, h, w] (on the CPU), or None."""
    try:
        img = Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB")
    except Exception:  # PIL raises many types on damaged files; this block only decodes
        return None
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def decode_batch(encoded: Sequence[torch.Tensor], device: torch.device) -> list[Optional[torch.Tensor]]:
    """Every item as RGB uint8 [3, h, w] on ``device``: JPEG bytes decoded there in one call
    (PIL on the CPU for any the decoder rejects), pixels from the workers moved; None if undecodable."""
    device = torch.device(device)
    out: list[Optional[torch.Tensor]] = [None] * len(encoded)
    jpeg = [i for i, e in enumerate(encoded) if e.dim() == 1]
    for i, img in zip(jpeg, _decode_jpegs([encoded[i] for i in jpeg], device) if jpeg else []):
        if img is None:
            img = _decode_pil(encoded[i])
        out[i] = None if img is None else img.to(device, non_blocking=True)
    for i, e in enumerate(encoded):
        if e.dim() == 3:
            out[i] = e.to(device, non_blocking=True)
    return out


class DeviceDecodedBatches:
    """Iterates a DataLoader of :func:`collate_encoded` batches as decoded device batches:
    ``{"images": PaddedImages, "index", "label", "skipped"}`` (``index``/``label`` of the rows
    kept, ``skipped`` counting the files the training process could not decode too)."""

    def __init__(self, loader, device: torch.device, paths, substitute: bool = False):
        self.loader, self.device, self.paths, self.substitute = loader, torch.device(device), paths, substitute

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        # the DataLoader's iterator now, not at the first batch: it draws its base seed from the
        # global RNG, which the training loop's rng_neutral_iter puts back only around iter()
        batches = iter(self.loader)
        return (self.decode(batch) for batch in batches)

    def decode(self, batch: dict) -> dict:
        """One :func:`collate_encoded` batch decoded on the device."""
        images = decode_batch(batch["encoded"], self.device)
        index, label = batch["index"], batch["label"]
        bad = [i for i, im in enumerate(images) if im is None]
        for i in bad:
            warn_unreadable(self.paths(int(index[i])), ValueError("not a decodable image"))
        good = [i for i, im in enumerate(images) if im is not None]
        rows = good
        if bad and self.substitute and good:  # a bad row takes the next decoded row (wrapping around)
            rows = [
                i if images[i] is not None else next((j for j in good if j > i), good[0]) for i in range(len(images))
            ]
        out = {"index": index[rows], "label": label[rows], "skipped": batch["skipped"] + len(bad)}
        if rows:
            out["images"] = PaddedImages([images[i] for i in rows], self.device)
        return out


def device_decoded_loader(index, sampler, data_cfg, device: torch.device, substitute: bool = False):
    """The ``data.decode=device`` training loader: workers read bytes (:func:`read_encoded`), each
    batch is decoded on ``device`` (:class:`DeviceDecodedBatches`). Needs ``data.augment_on=device``."""
    if data_cfg.augment_on != "device":
        raise UserError(
            "data.decode=device crops and augments on the device; add data.augment_on=device (or set data.decode=pil)"
        )
    dataset = ImageDataset(index, unchanged, views=1, substitute=substitute, load=read_encoded)
    loader = loader_from_config(dataset, sampler, data_cfg, collate_fn=collate_encoded)
    return DeviceDecodedBatches(loader, device, dataset.path, substitute=substitute)


class DeviceEvalTransform:
    """The evaluation transform of :func:`~interclr_cli.data.transforms.eval_transform` (resize the
    short side to ``max(eval_resize, image_size)``, centre-crop ``image_size``, normalise) with
    ``data.decode=device``: the workers read bytes (:meth:`dataset`, :func:`collate_encoded`) and
    :meth:`decode` decodes a batch on the device and resizes each image's centre box, the one
    that maps to the resized image's centre crop, with :func:`crop_resize` (torchvision's
    antialiased bilinear filter, reading the whole image as a resize before the crop does)."""

    def __init__(self, cfg):
        self.cfg, self.resize, self.paths = cfg, max(cfg.eval_resize, cfg.image_size), None

    def dataset(self, index) -> ImageDataset:
        ds = ImageDataset(index, unchanged, views=1, load=read_encoded)
        self.paths = ds.path
        return ds

    def boxes(self, hw: Sequence[tuple[int, int]]) -> torch.Tensor:
        """(x1, y1, x2, y2) [B, 4] in each image's pixels: torchvision's resize, then its centre crop."""
        h, w = np.array(hw, dtype=np.float64).reshape(-1, 2).T
        short = np.minimum(h, w)
        # the resized size: the short side becomes self.resize, the long one int(resize * long / short)
        nh = np.where(h <= w, self.resize, np.floor(self.resize * h / short))
        nw = np.where(w <= h, self.resize, np.floor(self.resize * w / short))
        s = self.cfg.image_size
        top, left = np.round((nh - s) / 2.0), np.round((nw - s) / 2.0)
        sy, sx = h / nh, w / nw
        return torch.from_numpy(np.stack([left * sx, top * sy, (left + s) * sx, (top + s) * sy], 1)).float()

    def decode(self, batch: dict, device: torch.device) -> dict:
        """A :func:`collate_encoded` batch as ``{"image": [B, 3, S, S] normalised, "index", "label", "skipped"}``."""
        out = DeviceDecodedBatches(None, device, self.paths).decode(batch)
        images = out.pop("images", None)
        s = self.cfg.image_size
        if images is None:
            out["image"] = torch.zeros(0, 3, s, s, device=device)
            return out
        boxes = host_to_device(self.boxes(images.hw), images.device)
        whole = torch.cat([torch.zeros_like(images.sizes), images.sizes.flip(1)], dim=1)  # (0, 0, w, h)
        x = images.crop_resize(boxes, s, bounds=whole).clamp_(0, 1)
        mean = torch.tensor(self.cfg.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.cfg.std, device=images.device).view(1, 3, 1, 1)
        out["image"] = (x - mean) / std
        return out
