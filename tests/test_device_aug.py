"""data.augment_on=device: batched MoCo v2 colour/grayscale/blur against torchvision, per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from interclr_cli.config.schema import DataConfig
from interclr_cli.data import DeviceAugment, crop_flip_transform
from interclr_cli.data import device_aug as D
from interclr_cli.data.datasets import load_rgb
from interclr_cli.data.device_aug import crop_resize, draw_crops
from interclr_cli.data.transforms import moco_v2_transform

pytestmark = pytest.mark.usefixtures("one_thread")

TV_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _images(n=6, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[0] = x[0, :1]  # a grey image (zero saturation: hue undefined)
    x[1, :, :2] = 0.0  # black pixels (v = 0)
    x[2, 0] = x[2, 1]  # ties between the maximum channels
    return x


@pytest.mark.parametrize("k", range(4))
def test_each_colour_op_matches_torchvision_per_image(k):
    x = _images()
    f = torch.linspace(-0.5, 0.5, len(x)) if k == 3 else torch.linspace(0.0, 2.0, len(x))
    got = D._OPS[k](x.clone(), f)
    want = torch.stack([TV_OPS[k](img, float(fi)) for img, fi in zip(x, f)])
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_grayscale_and_blur_match_torchvision():
    x = _images(size=16)
    torch.testing.assert_close(D.grayscale(x), TF.rgb_to_grayscale(x), rtol=0, atol=1e-7)
    sigma = torch.linspace(0.1, 2.0, len(x))
    got = D.gaussian_blur(x, sigma, 5)
    want = torch.stack([TF.gaussian_blur(img, [5, 5], [float(s), float(s)]) for img, s in zip(x, sigma)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_batch_augment_equals_torchvision_ops_in_each_images_own_order():
    cfg = DataConfig(image_size=12, color_jitter_p=0.7, grayscale_p=0.3, blur_p=0.5)
    aug = DeviceAugment(cfg, torch.device("cpu"), seed=3)
    x = _images(n=24)
    aug.gen.manual_seed(11)
    prm = aug.draw(len(x))
    assert len({tuple(o.tolist()) for o in prm["order"]}) > 1  # images really run different orders
    assert set(prm["order"].argsort(dim=1)[:, 3].tolist()) == {0, 1, 2, 3}  # the hue in every slot
    got = aug.apply(x, prm)
    k = D.blur_kernel_size(cfg.image_size)
    for b in range(len(x)):
        img = x[b]
        if prm["jitter_on"][b]:
            for op in prm["order"][b].tolist():
                img = TV_OPS[op](img, float(prm["factors"][b, op]))
        if prm["gray_on"][b]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if prm["blur_on"][b]:
            s = float(prm["sigma"][b])
            img = TF.gaussian_blur(img, [k, k], [s, s])
        torch.testing.assert_close(got[b], img, rtol=0, atol=5e-6, msg=f"image {b}")


def test_augment_reads_no_tensor_value_on_the_host():
    """No host-device sync in a view: no aten op that turns a tensor into a Python value or sizes a
    result by its data (item, nonzero, boolean-mask indexing, bool())."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    aug = DeviceAugment(DataConfig(image_size=8), torch.device("cpu"), seed=0)
    u8 = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    syncing = {"_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "item"}
    padded = D.PaddedImages([u8[0], u8[1, :, :5], u8[2, :, :, :7]], torch.device("cpu"))  # data.decode=device
    for run in (
        lambda: aug(u8, epoch=0, step_in_epoch=0),
        lambda: aug.from_images(u8, epoch=0, step_in_epoch=1),
        lambda: aug.from_images(padded, epoch=0, step_in_epoch=2),
    ):
        with Ops() as ops:
            run()
        assert ops.names and not syncing & set(ops.names), sorted(syncing & set(ops.names))
    with Ops() as ops:  # the recorder does see a host read
        bool(u8.sum() > 0)
    assert "_local_scalar_dense" in ops.names or "is_nonzero" in ops.names


def test_call_is_seeded_by_step_and_view_and_normalises():
    cfg = DataConfig(
        image_size=8, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.5]
    )
    aug = DeviceAugment(cfg, torch.device("cpu"), seed=0)
    u8 = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    out = aug(u8, epoch=0, step_in_epoch=0)  # every probability 0: normalisation only
    want = (u8.float() / 255 - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, want)
    full = DeviceAugment(DataConfig(image_size=8), torch.device("cpu"), seed=0)
    a = full(u8, epoch=2, step_in_epoch=5, view=0)
    assert torch.equal(a, full(u8, epoch=2, step_in_epoch=5, view=0))  # a function of its seed only
    for other in ({"step_in_epoch": 6}, {"view": 1}, {"rank": 1}):
        kw = {"epoch": 2, "step_in_epoch": 5, "view": 0, **other}
        assert not torch.equal(a, full(u8, **kw)), other
    with pytest.raises(ValueError, match="uint8"):
        full(u8.float(), epoch=0, step_in_epoch=0)


@pytest.mark.parametrize("images", [1, 3, 7])
def test_cpu_blocks_give_the_batch_at_once_bit_for_bit(monkeypatch, images):
    """The CPU runs the colour ops over cache-sized blocks of images; block sizes of 1, 3 and 7
    images (7 does not divide the batch of 10) give exactly the whole batch at once, normalised,
    for both entry points: the parameters are drawn for the batch, not per block."""
    cfg = DataConfig(image_size=16, color_jitter_p=0.8, grayscale_p=0.3, blur_p=0.5)
    aug = DeviceAugment(cfg, torch.device("cpu"), seed=5)
    u8 = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = [aug(u8, epoch=1, step_in_epoch=2), aug.from_images(u8, epoch=1, step_in_epoch=2)]
    assert aug.block(whole[0]) >= 10  # 10 images of 3 KB: one block by default
    monkeypatch.setattr(D, "CPU_BLOCK_BYTES", images * 3 * 16 * 16 * 4)
    assert aug.block(whole[0]) == images
    blocked = [aug(u8, epoch=1, step_in_epoch=2), aug.from_images(u8, epoch=1, step_in_epoch=2)]
    for a, b in zip(whole, blocked):
        assert torch.equal(a, b)
    assert not torch.equal(whole[0], whole[1])  # the two entry points really differ (crops)


def test_worker_and_device_paths_give_the_same_statistics(tiny_data):
    """The split pipeline is the MoCo v2 recipe: per-channel mean and spread of 400 augmented views
    agree with the all-in-the-workers (PIL) path."""
    cfg = DataConfig(image_size=16)
    paths = sorted(p for p in (tiny_data / "train").rglob("*") if p.is_file())[:20]
    imgs = [load_rgb(str(p)) for p in paths]
    torch.manual_seed(0)
    full, crop = moco_v2_transform(cfg), crop_flip_transform(cfg)
    pil = torch.stack([full(im) for _ in range(20) for im in imgs])
    u8 = torch.stack([crop(im) for _ in range(20) for im in imgs])
    assert u8.dtype == torch.uint8 and u8.shape == (400, 3, 16, 16)
    dev = DeviceAugment(cfg, torch.device("cpu"), seed=0)(u8, epoch=0, step_in_epoch=0)
    for stat in (lambda t: t.mean(dim=(0, 2, 3)), lambda t: t.std(dim=(0, 2, 3))):
        torch.testing.assert_close(stat(dev), stat(pil), rtol=0, atol=0.08)
    # colourfulness (spread across channels): jitter and grayscale move it (0.281 here; 0.318
    # with both switched off on the device side)
    spread = lambda t: t.std(dim=1).mean()  # noqa: E731
    assert abs(spread(dev) - spread(pil)) < 0.015


# -- data.in_memory: crops on the device, the image store ---------------------------------------


def test_draw_crops_follow_torchvision_random_resized_crop():
    from torchvision import transforms as T

    g = torch.Generator().manual_seed(0)
    boxes = draw_crops(20000, 32, 24, (0.2, 1.0), g, torch.device("cpu"))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 24).all() and (boxes[:, 3] <= 32).all() and (w >= 1).all()
    assert torch.equal(boxes, boxes.round())  # integer pixels, as torchvision
    torch.manual_seed(0)
    tv = torch.tensor(
        [T.RandomResizedCrop.get_params(torch.zeros(3, 32, 24), (0.2, 1.0), (3 / 4, 4 / 3)) for _ in range(20000)],
        dtype=torch.float,
    )  # (top, left, h, w)
    ours = {
        "area": (w * h).mean(),
        "log_ratio": (w / h).log().mean(),
        "left": boxes[:, 0].mean(),
        "top": boxes[:, 1].mean(),
    }
    theirs = {
        "area": (tv[:, 2] * tv[:, 3]).mean(),
        "log_ratio": (tv[:, 3] / tv[:, 2]).log().mean(),
        "left": tv[:, 1].mean(),
        "top": tv[:, 0].mean(),
    }
    for k in ours:
        assert abs(float(ours[k] - theirs[k])) < 0.02 * max(1.0, abs(float(theirs[k]))) + 0.01, (k, ours[k], theirs[k])
    # no attempt can fit (scale above the image's ratio range): torchvision's centred fallback
    tall = draw_crops(4, 40, 10, (1.0, 1.0), g, torch.device("cpu"))
    assert torch.equal(tall, torch.tensor([[0.0, 13.0, 10.0, 26.0]] * 4))  # w = 10, h = round(10 / (3/4)) = 13


def test_crop_resize_is_torchvisions_antialiased_resized_crop(tiny_data):
    x = torch.rand(3, 3, 16, 16)
    full = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 3)
    torch.testing.assert_close(crop_resize(x, full, 16), x, rtol=0, atol=1e-6)
    paths = sorted(p for p in (tiny_data / "train").rglob("*") if p.is_file())[:8]
    imgs = torch.stack([TF.pil_to_tensor(load_rgb(str(p))).float() / 255 for p in paths])
    flip = torch.arange(len(imgs)) % 2 == 1
    # shrinking (antialiased), enlarging, non-square boxes and sizes
    for (x1, y1, x2, y2), size in (((0, 0, 32, 32), 16), ((5, 3, 25, 30), 16), ((10, 10, 18, 16), 16),
                                   ((1, 2, 30, 31), 7), ((4, 4, 20, 28), 40), ((3, 0, 32, 11), 20)):  # fmt: skip
        boxes = torch.tensor([[x1, y1, x2, y2]] * len(imgs), dtype=torch.float)
        want = torch.stack([TF.resized_crop(im, y1, x1, y2 - y1, x2 - x1, [size, size], antialias=True) for im in imgs])
        torch.testing.assert_close(crop_resize(imgs, boxes, size), want, rtol=0, atol=2e-6)
        want = torch.where(flip.view(-1, 1, 1, 1), want.flip(-1), want)
        torch.testing.assert_close(crop_resize(imgs, boxes, size, flip), want, rtol=0, atol=2e-6)


def test_in_memory_store_substitutes_unreadable_images_and_checks_sizes(tmp_path):
    from interclr_cli.data import FileIndex, ImageDataset, InMemoryImages
    from interclr_cli.errors import UserError

    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (6, 4), (i * 40, 0, 0)).save(p)
        paths.append(str(p))
    (tmp_path / "1.png").write_bytes(b"not an image")
    (tmp_path / "4.png").write_bytes(b"")
    index = FileIndex(root=tmp_path, paths=paths, labels=np.arange(5), classes=[str(i) for i in range(5)])
    store = InMemoryImages(ImageDataset(index, lambda im: im), torch.device("cpu"))
    assert store.images.shape == (5, 3, 4, 6) and store.images.dtype == torch.uint8
    assert store.src.tolist() == [0, 2, 2, 3, 0]  # 1 -> next readable 2; 4 wraps around to 0
    b = store.batch([(1, 7), (3, 9), (4, 1)])
    assert b["index"].tolist() == [2, 3, 0] and b["label"].tolist() == [2, 3, 0] and b["skipped"] == 2
    assert b["images"][:, 0, 0, 0].tolist() == [80, 120, 0]  # the red level of each served image
    Image.new("RGB", (5, 5)).save(tmp_path / "3.png")
    with pytest.raises(UserError, match="one size"):
        InMemoryImages(ImageDataset(index, lambda im: im), torch.device("cpu"))


def test_from_images_is_seeded_and_shaped():
    cfg = DataConfig(image_size=8)
    aug = DeviceAugment(cfg, torch.device("cpu"), seed=0)
    imgs = torch.randint(0, 256, (6, 3, 12, 10), dtype=torch.uint8)
    a = aug.from_images(imgs, epoch=0, step_in_epoch=3, view=1)
    assert a.shape == (6, 3, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, aug.from_images(imgs, epoch=0, step_in_epoch=3, view=1))
    assert not torch.equal(a, aug.from_images(imgs, epoch=0, step_in_epoch=3, view=0))
