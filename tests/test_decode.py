"""data.decode=device: workers read bytes, the training process decodes, crops and augments on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from conftest import TINY, assert_clean_error, run_cli
from PIL import Image
from safetensors.torch import load_file

from interclr_cli.config.schema import DataConfig
from interclr_cli.data import DeviceAugment, EpochBatchSampler, FileIndex, ImageDataset, moco_v2_transform
from interclr_cli.data.decode import (
    DeviceDecodedBatches,
    collate_encoded,
    decode_batch,
    device_decoded_loader,
    read_encoded,
    unchanged,
)
from interclr_cli.data.device_aug import PaddedImages, crop_resize, draw_crops
from interclr_cli.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _pil_rgb(path) -> torch.Tensor:
    return TF.pil_to_tensor(Image.open(path).convert("RGB"))


def _photo(h: int, w: int, seed: int) -> Image.Image:
    """A smooth colour image (JPEG-friendly) of size w x h."""
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.05, 0.3, 3)
    rgb = np.stack([np.sin(a * xx + 1), np.cos(b * yy), np.sin(c * (xx + yy))], -1)
    return Image.fromarray(((rgb + 1) * 127.5).astype(np.uint8))


@pytest.fixture
def mixed_files(tmp_path):
    """RGB, grey and CMYK JPEGs of several sizes, a PNG, a corrupt JPEG, a corrupt PNG, a missing file."""
    files = {}
    for name, (h, w), mode in [("rgb", (20, 30), "RGB"), ("gray", (33, 17), "L"), ("cmyk", (24, 24), "CMYK")]:
        p = tmp_path / f"{name}.jpg"
        _photo(h, w, len(files)).convert(mode).save(p, "JPEG", quality=90)
        files[name] = p
    files["png"] = tmp_path / "img.png"
    _photo(15, 26, 9).save(files["png"])
    files["bad_jpeg"] = tmp_path / "bad.jpg"
    files["bad_jpeg"].write_bytes(b"\xff\xd8\xff" + bytes(range(200)))  # a JPEG header, then garbage
    files["bad_png"] = tmp_path / "bad.png"
    files["bad_png"].write_bytes(b"not an image")
    files["missing"] = tmp_path / "gone.jpg"
    return files


def test_read_encoded_keeps_jpeg_bytes_and_decodes_other_formats_with_pil(mixed_files):
    raw = read_encoded(str(mixed_files["rgb"]))
    assert raw.dtype == torch.uint8 and raw.dim() == 1 and raw.numpy().tobytes() == mixed_files["rgb"].read_bytes()
    png = read_encoded(str(mixed_files["png"]))
    assert png.shape == (3, 15, 26) and torch.equal(png, _pil_rgb(mixed_files["png"]))
    for name in ("bad_png", "missing"):  # unreadable in the worker: None, i.e. skipped by the collate
        assert read_encoded(str(mixed_files[name])) is None
    assert read_encoded(str(mixed_files["bad_jpeg"])).dim() == 1  # only the decoder can tell


def test_decode_batch_gives_pils_pixels_for_rgb_grey_cmyk_and_png(mixed_files):
    names = ["rgb", "gray", "cmyk", "png", "bad_jpeg"]
    out = decode_batch([read_encoded(str(mixed_files[n])) for n in names], CPU)
    assert out[-1] is None  # undecodable by both decoders
    for name, img in zip(names[:-1], out[:-1]):
        want = _pil_rgb(mixed_files[name])  # grey and CMYK converted to RGB as PIL does
        assert img.shape == want.shape and img.dtype == torch.uint8, name
        assert (img.int() - want.int()).abs().max() <= 1, name


def _index(paths) -> FileIndex:
    return FileIndex(root=paths[0].parent, paths=[str(p) for p in paths], labels=np.arange(len(paths)), classes=[])


def test_decoded_batches_count_unreadable_files_as_skipped(mixed_files):
    order = ["rgb", "bad_jpeg", "gray", "missing", "png", "bad_png", "cmyk"]
    index = _index([mixed_files[n] for n in order])
    ds = ImageDataset(index, unchanged, views=1, load=read_encoded)
    batch = collate_encoded([ds[(i, 0)] for i in range(len(order))])
    assert batch["skipped"] == 2 and batch["index"].tolist() == [0, 1, 2, 4, 6]  # the workers' two
    got = DeviceDecodedBatches([batch], CPU, ds.path).decode(batch)
    assert got["skipped"] == 3 and got["index"].tolist() == [0, 2, 4, 6] and got["label"].tolist() == [0, 2, 4, 6]
    assert got["images"].count == 4
    assert got["images"].sizes.tolist() == [[20, 30], [33, 17], [15, 26], [24, 24]]
    # several ranks: every row kept, an undecodable one served by the next decoded row
    sub = ImageDataset(index, unchanged, views=1, load=read_encoded, substitute=True)
    batch = collate_encoded([sub[(i, 0)] for i in range(len(order))])
    assert batch["skipped"] == 2 and batch["index"].tolist() == [0, 1, 2, 4, 4, 6, 6]
    got = DeviceDecodedBatches([batch], CPU, ds.path, substitute=True).decode(batch)
    assert got["skipped"] == 3 and got["index"].tolist() == [0, 2, 2, 4, 4, 6, 6] and got["images"].count == 7


def test_padded_batch_crops_each_image_as_if_alone():
    """Mixed sizes: a crop from the padded canvases equals the crop from that image's own tensor,
    at the image's edges too (the repeated last row and column), in one canvas or several."""
    g = torch.Generator().manual_seed(0)
    sizes = [(20, 30), (33, 17), (24, 24), (9, 40), (24, 24)]
    imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    hw = torch.tensor(sizes, dtype=torch.float32)
    boxes = draw_crops(len(imgs), hw[:, 0], hw[:, 1], (0.2, 1.0), g, CPU)
    boxes[0] = torch.tensor([0.0, 0.0, 30.0, 20.0])  # the whole image: every edge
    boxes[1] = torch.tensor([5.0, 20.0, 17.0, 33.0])  # the bottom-right corner
    want = torch.stack([crop_resize(im[None].float() / 255, b[None], 8)[0] for im, b in zip(imgs, boxes)])
    for budget in (1 << 27, 3 * 34 * 41):  # one canvas; one per image or two
        padded = PaddedImages(imgs, CPU, budget=budget)
        assert (len(padded.chunks) == 1) == (budget == 1 << 27)
        torch.testing.assert_close(padded.crop_resize(boxes, 8), want, rtol=0, atol=1e-6)


def test_crop_boxes_follow_random_resized_crop_per_image_size():
    """Per-image sizes: each image's boxes have torchvision's statistics for its own size."""
    from torchvision import transforms as T

    sizes = torch.tensor([[32.0, 24.0], [20.0, 48.0]]).repeat(10000, 1)  # (h, w), alternating
    boxes = draw_crops(len(sizes), sizes[:, 0], sizes[:, 1], (0.2, 1.0), torch.Generator().manual_seed(0), CPU)
    torch.manual_seed(0)
    for k, (h, w) in enumerate([(32, 24), (20, 48)]):
        b = boxes[k::2]
        bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        tv = torch.tensor(
            [T.RandomResizedCrop.get_params(torch.zeros(3, h, w), (0.2, 1.0), (3 / 4, 4 / 3)) for _ in range(10000)],
            dtype=torch.float,
        )  # (top, left, h, w)
        ours = [(bw * bh).mean() / (h * w), (bw / bh).log().mean(), b[:, 0].mean() / w, b[:, 1].mean() / h]
        theirs = [(tv[:, 2] * tv[:, 3]).mean() / (h * w), (tv[:, 3] / tv[:, 2]).log().mean(), tv[:, 1].mean() / w]
        theirs.append(tv[:, 0].mean() / h)
        for name, a, t in zip(("area", "log_ratio", "left", "top"), ours, theirs):
            assert abs(float(a - t)) < 0.015, (h, w, name, float(a), float(t))


def test_padded_and_stacked_images_give_the_same_views():
    """One size: data.decode=device's views are data.in_memory's (same seeds, same crops)."""
    aug = DeviceAugment(DataConfig(image_size=8), CPU, seed=0)
    imgs = torch.randint(0, 256, (6, 3, 12, 10), dtype=torch.uint8)
    a = aug.from_images(imgs, epoch=1, step_in_epoch=3, view=1)
    b = aug.from_images(PaddedImages(list(imgs), CPU), epoch=1, step_in_epoch=3, view=1)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    split = PaddedImages(list(imgs), CPU, budget=2 * 3 * 12 * 10)  # three canvases of two images
    assert len(split.chunks) == 3
    torch.testing.assert_close(aug.from_images(split, epoch=1, step_in_epoch=3, view=1), a, rtol=0, atol=1e-5)


def test_decoded_views_have_the_statistics_of_the_pil_path(tiny_data):
    """The MoCo v2 recipe either way: per-channel mean and spread of 400 views of real JPEGs agree."""
    cfg = DataConfig(image_size=16, augment_on="device", decode="device", num_workers=0)
    paths = sorted(p for p in (tiny_data / "train").rglob("*.jpg"))[:20]
    assert len(paths) == 20
    index = _index(paths * 20)
    sampler = EpochBatchSampler(len(index), 400, replacement=False, seed=0)
    sampler.set_epoch(0)
    batch = next(iter(device_decoded_loader(index, sampler, cfg, CPU)))
    dev = DeviceAugment(cfg, CPU, seed=0).from_images(batch["images"], epoch=0, step_in_epoch=0)
    assert dev.shape == (400, 3, 16, 16) and batch["skipped"] == 0
    torch.manual_seed(0)
    full = moco_v2_transform(cfg)
    pil = torch.stack([full(Image.open(p).convert("RGB")) for _ in range(20) for p in paths])
    for stat in (lambda t: t.mean(dim=(0, 2, 3)), lambda t: t.std(dim=(0, 2, 3))):
        torch.testing.assert_close(stat(dev), stat(pil), rtol=0, atol=0.08)


def test_decode_device_needs_augment_on_device(tiny_data, tmp_path):
    with pytest.raises(UserError, match="augment_on=device"):
        device_decoded_loader(_index([tiny_data]), None, DataConfig(decode="device"), CPU)
    out = tmp_path / "run"
    res = run_cli("pretrain", "--preset", "mocov2-r18-cifar", "--out", str(out), f"data.root={tiny_data / 'train'}",
                  "data.decode=device", "data.augment_on=workers", "train.max_steps=1", *TINY)  # fmt: skip
    assert_clean_error(res, fragment="data.augment_on=device")
    assert not out.exists()


def _model_tensors(path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(("model.", "optim.", "method."))}


def test_decode_device_pretrains_and_resumes_mid_epoch_exactly(tiny_data, tmp_path):
    from pathlib import Path

    from interclr_cli.commands.pretrain import run_pretrain

    common = dict(preset="mocov2-r18-cifar", force=False, show_progress=False)
    ov = [f"data.root={tiny_data / 'train'}", "train.epochs=2", "data.augment_on=device", "data.decode=device", *TINY]
    ref = run_pretrain(overrides=ov, out=str(tmp_path / "ref"), resume=None, **common)
    part = run_pretrain(overrides=ov + ["train.max_steps=3"], out=str(tmp_path / "p"), resume=None, **common)
    assert part["steps"] == 3
    done = run_pretrain(
        preset=None, overrides=["train.max_steps=0"], out=str(tmp_path / "p"), resume="__latest__", force=False,
        show_progress=False,
    )  # fmt: skip
    assert done["steps"] == ref["steps"] == 12
    a, b = _model_tensors(Path(ref["checkpoint"])), _model_tensors(Path(done["checkpoint"]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the device path really ran: a PIL-worker run of the same config trains to other weights
    pil = run_pretrain(overrides=ov[:2] + ["data.augment_on=device", *TINY], out=str(tmp_path / "w"), resume=None,
                       **common)  # fmt: skip
    c = _model_tensors(Path(pil["checkpoint"]))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_feature_extraction_with_device_decode_matches_the_pil_path(mixed_files, tiny_data):
    """Monitors and evaluation commands: features through data.decode=device match the PIL eval
    transform's (same pixels, the same filter; PIL rounds to 8 bits), corrupt files give zero rows."""
    from interclr_cli.data import eval_transform
    from interclr_cli.data.decode import DeviceEvalTransform
    from interclr_cli.training.features import default_eval_transform, extract

    jpgs = sorted((tiny_data / "train").rglob("*.jpg"))[:10]
    wide = mixed_files["rgb"].parent / "wide.jpg"
    _photo(30, 70, 3).save(wide, "JPEG", quality=90)
    paths = jpgs + [mixed_files[n] for n in ("rgb", "gray", "cmyk", "png", "bad_jpeg")] + [wide]
    index = _index(paths)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    for size, resize in ((32, 32), (24, 28), (48, 56)):
        cfg = DataConfig(image_size=size, eval_resize=resize, decode="device")
        assert isinstance(default_eval_transform(cfg), DeviceEvalTransform)
        kw = dict(device=CPU, batch_size=6, num_workers=0)
        (dev,), _ = extract(net, index, DeviceEvalTransform(cfg), **kw)
        (pil,), _ = extract(net, index, eval_transform(cfg), **kw)
        bad = paths.index(mixed_files["bad_jpeg"])
        assert dev[bad].abs().sum() == 0 and pil[bad].abs().sum() == 0  # skipped either way
        err = (dev - pil).norm(dim=1) / pil.norm(dim=1).clamp_min(1e-6)
        err[bad] = 0
        assert err.max() < 0.004, (size, resize, err)  # PIL rounds to 8 bits after resizing
        if size == resize == 32:  # the CIFAR files pass through untouched: the same pixels, the same features
            assert err[: len(jpgs)].max() < 1e-5, err


def test_decoded_loader_leaves_the_global_rng_alone_under_rng_neutral_iter(tiny_data):
    """The DataLoader draws its base seed when its iterator starts: that must happen inside
    ``iter()``, where the training loop's rng_neutral_iter restores the global RNG."""
    from interclr_cli.training.features import rng_neutral_iter

    paths = sorted((tiny_data / "train").rglob("*.jpg"))[:16]
    sampler = EpochBatchSampler(16, 8, replacement=False, seed=0)
    sampler.set_epoch(0)
    cfg = DataConfig(image_size=8, augment_on="device", decode="device", num_workers=0)
    loader = device_decoded_loader(_index(paths), sampler, cfg, CPU)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    batches = list(rng_neutral_iter(loader))
    assert len(batches) == 2 and torch.equal(torch.get_rng_state(), before)
