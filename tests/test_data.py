"""The data layer: indexing, caching, errors, loading, augmentation determinism, sampling."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from interclr_cli.config.schema import DataConfig
from interclr_cli.data import (
    BUILTIN_DATASETS,
    EpochBatchSampler,
    FileIndex,
    ImageDataset,
    build_eval_loader,
    build_loader,
    collate_skip,
    eval_shard,
    eval_transform,
    index_source,
    linear_train_transform,
    moco_v2_transform,
    resolve_builtin,
    resolve_eval_split,
)
from interclr_cli.data import datasets as datasets_mod
from interclr_cli.errors import UserError

CFG32 = DataConfig(image_size=32, eval_resize=32)


def make_image(path: Path, seed: int = 0, size: tuple[int, int] = (40, 36)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def make_imagefolder(root: Path, classes=("cat", "ant", "bee"), per_class: int = 3) -> Path:
    for c, cls in enumerate(classes):
        for j in range(per_class):
            make_image(root / cls / f"{j:02d}.png", seed=10 * c + j)
    return root


def user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as exc:
        fn(*args, **kwargs)
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


# -- indexing ---------------------------------------------------------------------------------


def test_imagefolder_labels_class_order_and_filters(tmp_path):
    root = make_imagefolder(tmp_path / "d")
    make_image(root / "ant" / "deep" / "x.png", seed=99)  # nested inside a class: included
    make_image(root / "bee" / "UPPER.PNG", seed=98)  # extension case-insensitive
    (root / "bee" / "notes.txt").write_text("not an image")
    make_image(root / "bee" / ".hidden.png", seed=97)  # hidden: skipped
    idx = index_source(str(root))
    assert idx.source == "imagefolder" and idx.root == str(root)
    assert idx.classes == ["ant", "bee", "cat"]
    rel = [os.path.relpath(p, root) for p in idx.paths]
    assert rel == [
        "ant/00.png", "ant/01.png", "ant/02.png", "ant/deep/x.png",
        "bee/00.png", "bee/01.png", "bee/02.png", "bee/UPPER.PNG",
        "cat/00.png", "cat/01.png", "cat/02.png",
    ]  # fmt: skip
    assert all(os.path.isabs(p) for p in idx.paths)
    assert idx.labels.dtype == np.int64
    assert idx.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 3
    assert len(idx) == 11 and idx.has_labels
    # Explicit source gives the same index; the order does not depend on creation order.
    again = index_source(str(root), "imagefolder")
    assert again.paths == idx.paths and (again.labels == idx.labels).all()


def test_folder_flat_and_nested(tmp_path):
    flat = tmp_path / "flat"
    for name in ["b.jpg", "a.png", "c.webp"]:
        make_image(flat / name)
    (flat / "readme.md").write_text("x")
    idx = index_source(str(flat))
    assert idx.source == "folder" and not idx.has_labels and idx.classes == []
    assert [os.path.basename(p) for p in idx.paths] == ["a.png", "b.jpg", "c.webp"]
    assert idx.labels.tolist() == [-1, -1, -1]

    # Images at the top level plus sub-folders: a plain folder, scanned recursively in name order.
    mixed = tmp_path / "mixed"
    make_image(mixed / "m.png")
    make_image(mixed / "a" / "1.png")
    make_image(mixed / "z" / "y" / "2.png")
    idx = index_source(str(mixed))
    assert idx.source == "folder"
    assert [os.path.relpath(p, mixed) for p in idx.paths] == ["a/1.png", "m.png", "z/y/2.png"]

    # No images in the immediate sub-folders, only deeper: a nested plain folder.
    deep = tmp_path / "deep"
    make_image(deep / "2024" / "01" / "a.png")
    make_image(deep / "2024" / "02" / "b.png")
    idx = index_source(str(deep))
    assert idx.source == "folder" and len(idx) == 2


def test_split_root_indexes_train_only(tmp_path):
    make_imagefolder(tmp_path / "ds" / "train")
    make_imagefolder(tmp_path / "ds" / "test", per_class=1)
    idx = index_source(str(tmp_path / "ds"))
    assert idx.root == str(tmp_path / "ds" / "train")
    assert idx.source == "imagefolder" and len(idx) == 9


def test_filelist_relative_paths_labels_and_comments(tmp_path):
    img_a = make_image(tmp_path / "imgs" / "a.png")
    make_image(tmp_path / "imgs" / "b c.png")  # a space in the name
    outside = make_image(tmp_path / "elsewhere" / "o.jpg")
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text(f"# a comment\n\n../imgs/a.png 2\n../imgs/b c.png   0\n{outside} 1\n")
    idx = index_source(str(lst))
    assert idx.source == "filelist" and idx.root == str(lst)
    assert idx.paths == [str(img_a), str(tmp_path / "imgs" / "b c.png"), str(outside)]
    assert idx.labels.tolist() == [2, 0, 1] and idx.classes == ["0", "1", "2"] and idx.has_labels

    unlabelled = tmp_path / "lists" / "u.txt"
    unlabelled.write_text("../imgs/b c.png\n../imgs/a.png\n")
    idx = index_source(str(unlabelled), "filelist")
    assert idx.labels.tolist() == [-1, -1] and not idx.has_labels and idx.classes == []
    assert idx.paths == [str(tmp_path / "imgs" / "b c.png"), str(img_a)]


# -- the index cache ------------------------------------------------------------------------------


def test_cache_round_trip_does_not_scan(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "d")
    cache = tmp_path / "run" / "index.txt"
    first = index_source(str(root), cache_path=cache)
    assert cache.is_file()
    assert not [p for p in cache.parent.iterdir() if p.name != "index.txt"]  # no temp files left

    def no_scan(*a, **k):
        raise AssertionError("scanned despite a valid cache")

    monkeypatch.setattr(os, "scandir", no_scan)
    second = index_source(str(root), cache_path=cache)
    assert second == FileIndex(first.root, first.paths, second.labels, first.classes, first.source)
    assert second.labels.dtype == np.int64 and (second.labels == first.labels).all()

    # A new file does not change a resumed run's index.
    monkeypatch.undo()
    make_image(root / "ant" / "new.png")
    assert index_source(str(root), cache_path=cache).paths == first.paths

    # Another source kind (or root) rescans and rewrites the cache.
    scans = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: scans.append(p) or real(p))
    folder = index_source(str(root), "folder", cache_path=cache)
    assert scans and folder.source == "folder" and len(folder) == len(first) + 1


def test_cache_of_filelist_with_absolute_paths_and_unlabelled(tmp_path, monkeypatch):
    a = make_image(tmp_path / "x" / "a.png")
    b = make_image(tmp_path / "y" / "b.png")
    lst = tmp_path / "l.txt"
    lst.write_text(f"{b}\n{a} 3\n")
    cache = tmp_path / "c.idx"
    first = index_source(str(lst), cache_path=cache)
    monkeypatch.setattr(os, "scandir", None)
    second = index_source(str(lst), cache_path=cache)
    assert second.paths == first.paths == [str(b), str(a)]
    assert second.labels.tolist() == [-1, 3] and second.classes == ["0", "1", "2", "3"]


def test_cache_skipped_for_file_names_with_line_breaks(tmp_path):
    root = tmp_path / "d"
    make_image(root / "a.png")
    make_image(root / "odd\nname.png")
    cache = tmp_path / "index.txt"
    idx = index_source(str(root), cache_path=cache)
    assert len(idx) == 2 and not cache.exists()


def test_corrupt_cache_is_rescanned(tmp_path):
    root = make_imagefolder(tmp_path / "d")
    cache = tmp_path / "index.txt"
    cache.write_text("{not json\n")
    assert len(index_source(str(root), cache_path=cache)) == 9
    header = cache.read_text().splitlines()[0]
    assert '"format": "interclr-file-index"' in header


# -- errors ---------------------------------------------------------------------------------------


def test_error_messages_are_one_line(tmp_path):
    msg = user_error(index_source, str(tmp_path / "nope"))
    assert f"data root {tmp_path / 'nope'} does not exist" in msg and "data.root=" in msg

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "a.txt").write_text("x")
    assert "holds no images" in user_error(index_source, str(empty))
    assert "holds no images" in user_error(index_source, str(empty), "imagefolder")

    make_image(tmp_path / "imgs" / "a.png")
    lst = tmp_path / "list.txt"
    lst.write_text("imgs/a.png 0\n# c\nimgs/missing.png 1\n")
    msg = user_error(index_source, str(lst))
    assert "line 3" in msg and str(tmp_path / "imgs" / "missing.png") in msg

    (tmp_path / "blank.txt").write_text("# only a comment\n")
    assert "lists no images" in user_error(index_source, str(tmp_path / "blank.txt"))

    lst.write_text("imgs/a.png -3\n")
    assert "negative" in user_error(index_source, str(lst))

    msg = user_error(index_source, "builtin:imagenet-huge")
    assert "imagenet-huge" in msg and "builtin:cifar10-mini" in msg

    msg = user_error(index_source, str(tmp_path / "imgs"), "lmdb")
    assert "lmdb" in msg and "imagefolder" in msg

    assert "is a folder" in user_error(index_source, str(tmp_path / "imgs"), "filelist")
    assert "is a file" in user_error(index_source, str(lst), "folder")
    assert "data.root is empty" in user_error(index_source, "")


# -- builtin and evaluation splits ----------------------------------------------------------------


def test_builtin_cifar10_mini():
    path = resolve_builtin("cifar10-mini")
    assert path == BUILTIN_DATASETS["cifar10-mini"] and (path / "README.md").is_file()
    assert resolve_builtin("builtin:cifar10-mini") == path
    train = index_source("builtin:cifar10-mini")
    assert train.root == str(path / "train") and len(train) == 5000
    assert len(train.classes) == 10 and "airplane" in train.classes
    assert np.bincount(train.labels).tolist() == [500] * 10
    test = index_source("builtin:cifar10-mini/test")
    assert len(test) == 1000 and test.classes == train.classes
    assert np.bincount(test.labels).tolist() == [100] * 10
    with Image.open(train.paths[0]) as im:
        assert im.size == (32, 32)


def test_resolve_eval_split_builtin():
    cfg = DataConfig()  # root = builtin:cifar10-mini (train/ and test/)
    train = resolve_eval_split(cfg, "train")
    val = resolve_eval_split(cfg, "val")
    assert (len(train), len(val)) == (5000, 1000)
    assert val.root.endswith(os.path.join("cifar10-mini", "test"))
    assert train.has_labels and val.has_labels and train.classes == val.classes


def test_resolve_eval_split_folders_and_errors(tmp_path):
    root = tmp_path / "ds"
    make_imagefolder(root / "train")
    make_imagefolder(root / "test", per_class=1)
    cfg = DataConfig(root=str(root))
    assert resolve_eval_split(cfg, "val").root == str(root / "test")
    make_imagefolder(root / "val", per_class=2)
    assert resolve_eval_split(cfg, "val").root == str(root / "val")  # val/ wins over test/
    assert len(resolve_eval_split(cfg, "train")) == 9

    # Explicit splits, including a labelled file list.
    lst = tmp_path / "val.txt"
    lst.write_text("ds/test/ant/00.png 1\nds/test/cat/00.png 0\n")
    cfg2 = DataConfig(root=str(root), val=str(lst), train=str(root / "val"))
    assert resolve_eval_split(cfg2, "val").labels.tolist() == [1, 0]
    assert len(resolve_eval_split(cfg2, "train")) == 6

    # Missing splits and unlabelled ones are one-line user errors.
    bare = tmp_path / "bare"
    make_imagefolder(bare)
    msg = user_error(resolve_eval_split, DataConfig(root=str(bare)), "val")
    assert "neither" in msg and "data.val=" in msg
    assert "data.train=" in user_error(resolve_eval_split, DataConfig(root=str(bare)), "train")
    unl = tmp_path / "u.txt"
    unl.write_text("ds/test/ant/00.png\n")
    assert "unlabelled" in user_error(resolve_eval_split, DataConfig(root=str(root), val=str(unl)), "val")
    assert "file list" in user_error(resolve_eval_split, DataConfig(root=str(unl)), "train")
    assert "unknown evaluation split" in user_error(resolve_eval_split, cfg, "holdout")


# -- loading, corrupt files, augmentation ---------------------------------------------------------


def test_corrupt_image_warns_once_and_is_skipped(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(datasets_mod, "_warned", set())
    root = make_imagefolder(tmp_path / "d", per_class=2)
    bad = root / "bee" / "01.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    idx = index_source(str(root))
    ds = ImageDataset(idx, moco_v2_transform(CFG32))
    i = idx.paths.index(str(bad))
    with caplog.at_level(logging.WARNING, logger="interclr.data"):
        assert ds[(i, 5)] is None
        assert ds[i] is None
    warnings = [r for r in caplog.records if str(bad) in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].name == "interclr.data"

    batch = collate_skip([ds[(j, j)] for j in range(len(ds))])
    assert batch["skipped"] == 1 and batch["index"].numel() == len(ds) - 1
    assert batch["view1"].shape == (len(ds) - 1, 3, 32, 32)
    assert batch["index"].dtype == torch.int64 and i not in batch["index"].tolist()
    assert batch["label"].dtype == torch.int64

    empty = collate_skip([ds[(i, 1)], ds[(i, 2)]])
    assert empty["index"].numel() == 0 and empty["skipped"] == 2 and empty["label"].shape == (0,)


def test_substitute_replaces_unreadable_images_keeping_the_batch_full(tmp_path, monkeypatch):
    """Distributed training: a batch keeps its size (ranks must step together); the unreadable
    file is replaced by the next readable one in index order and still counted as skipped."""
    monkeypatch.setattr(datasets_mod, "_warned", set())
    root = make_imagefolder(tmp_path / "d", per_class=3)
    idx = index_source(str(root))
    n = len(idx)
    bad = [n - 2, n - 1, 0]  # the last two and the first: the search wraps around to index 1
    for j in bad:
        Path(idx.paths[j]).write_bytes(b"not an image")
    ds = ImageDataset(idx, moco_v2_transform(CFG32), substitute=True)
    plain = ImageDataset(idx, moco_v2_transform(CFG32))
    assert ds[(n - 2, 7)]["index"] == 1 and ds[(0, 7)]["index"] == 1
    # the substitute's views are those of the readable image under the same augmentation seed
    assert torch.equal(ds[(n - 1, 7)]["view1"], plain[(1, 7)]["view1"])
    assert ds[(3, 7)]["index"] == 3 and "replaced" not in ds[(3, 7)]

    batch = collate_skip([ds[(j, j)] for j in range(n)])
    assert batch["view1"].shape[0] == n and batch["skipped"] == 3
    assert batch["index"].tolist() == [1] + list(range(1, n - 2)) + [1, 1]
    assert set(batch) == {"view1", "view2", "index", "label", "skipped"}
    assert batch["label"].tolist() == [int(idx.labels[j]) for j in batch["index"].tolist()]

    for j in range(n):  # nothing readable at all: None, as without substitution
        Path(idx.paths[j]).write_bytes(b"not an image")
    assert ds[(2, 1)] is None


def test_augmentation_is_a_pure_function_of_index_and_seed(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=2)
    cfg = DataConfig(image_size=32, blur_p=1.0, color_jitter_p=1.0)
    ds = ImageDataset(index_source(str(root)), moco_v2_transform(cfg))
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = ds[(2, 77)]
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG is untouched
    b = ds[(2, 77)]
    c = ds[(2, 78)]
    assert set(a) == {"view1", "view2", "index", "label"}
    assert a["index"] == 2 and a["label"] == 1  # ant ant [bee] ...
    assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["view2"], b["view2"])
    assert not torch.equal(a["view1"], c["view1"])
    assert not torch.equal(a["view1"], a["view2"])  # two different views

    # One transform per view: the second view is the deterministic evaluation crop.
    mixed = ImageDataset(index_source(str(root)), [moco_v2_transform(cfg), eval_transform(CFG32)])
    m = mixed[(2, 77)]
    assert torch.equal(m["view1"], a["view1"]) and torch.equal(m["view2"], mixed[(2, 5)]["view2"])

    single = ImageDataset(ds_index := index_source(str(root)), eval_transform(CFG32), views=1)
    item = single[4]
    assert set(item) == {"image", "index", "label"} and item["image"].shape == (3, 32, 32)
    assert item["label"] == ds_index.labels[4]


def test_loader_batches_identical_with_0_and_2_workers(tmp_path):
    root = make_imagefolder(tmp_path / "d", classes=("a", "b"), per_class=10)
    ds = ImageDataset(index_source(str(root)), moco_v2_transform(CFG32))

    def epoch(num_workers: int):
        sampler = EpochBatchSampler(len(ds), 4, replacement=False, seed=3)
        sampler.set_epoch(1, start_step=1)
        loader = build_loader(
            ds, sampler, num_workers=num_workers, pin_memory=True, persistent_workers=True, prefetch_factor=2
        )
        assert len(loader) == 4
        return list(loader)

    serial, parallel = epoch(0), epoch(2)
    assert len(serial) == len(parallel) == 4
    for x, y in zip(serial, parallel):
        assert x["skipped"] == y["skipped"] == 0
        for k in ("view1", "view2", "index", "label"):
            assert torch.equal(x[k], y[k]), k


def test_eval_loader_covers_every_index_once_in_order(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=3)
    ds = ImageDataset(index_source(str(root)), eval_transform(CFG32), views=1)
    seen = []
    for rank in range(4):
        shard = eval_shard(len(ds), rank, 4)
        got = [i for b in build_eval_loader(ds, 2, 0, rank=rank, world_size=4) for i in b["index"].tolist()]
        assert got == list(shard)
        seen += got
    assert seen == list(range(len(ds)))
    assert [len(eval_shard(10, r, 4)) for r in range(4)] == [3, 3, 3, 1]
    assert [len(eval_shard(9, r, 4)) for r in range(4)] == [3, 3, 3, 0]
    one = next(iter(build_eval_loader(ds, 100, 0)))
    assert one["image"].shape == (9, 3, 32, 32)


def test_transforms_shapes_and_small_image_variants(tmp_path):
    img = Image.open(make_image(tmp_path / "a.png", size=(48, 40))).convert("RGB")
    big = DataConfig(image_size=64, eval_resize=72)
    assert moco_v2_transform(big)(img).shape == (3, 64, 64)
    e = eval_transform(big)
    assert torch.equal(e(img), e(img)) and e(img).shape == (3, 64, 64)
    names = [type(t).__name__ for t in linear_train_transform(CFG32).transforms]
    assert "RandomCrop" in names and "RandomResizedCrop" not in names
    names = [type(t).__name__ for t in linear_train_transform(DataConfig(image_size=96)).transforms]
    assert "RandomResizedCrop" in names
    assert linear_train_transform(CFG32)(img).shape == (3, 32, 32)
    # Small images with eval_resize <= image_size: resize to image_size, then centre-crop.
    assert eval_transform(DataConfig(image_size=32, eval_resize=28))(img).shape == (3, 32, 32)
    normalized = eval_transform(CFG32)(img)
    assert normalized.min() < 0  # mean/std applied


def test_blur_matches_torchvision():
    from torchvision import transforms as T

    from interclr_cli.data.transforms import GaussianBlur, blur_kernel_size

    assert [blur_kernel_size(s) for s in (32, 96, 224)] == [3, 9, 23]
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8))
    for seed in range(3):
        torch.manual_seed(seed)
        ref = np.asarray(T.GaussianBlur(5, (0.1, 2.0))(img), dtype=int)
        torch.manual_seed(seed)
        ours = np.asarray(GaussianBlur(5, (0.1, 2.0))(img), dtype=int)
        assert np.abs(ref - ours).max() <= 1


# -- sampler --------------------------------------------------------------------------------------


def batches(sampler: EpochBatchSampler) -> list[list[tuple[int, int]]]:
    return [list(b) for b in sampler]


@pytest.mark.parametrize("n", [96, 103])
def test_sampler_ranks_are_disjoint_equal_and_cover_the_global_batch(n):
    world, bs = 3, 8
    one = EpochBatchSampler(n, bs * world, replacement=False, seed=5)
    ranks = [EpochBatchSampler(n, bs, replacement=False, seed=5, rank=r, world_size=world) for r in range(world)]
    for s in [one, *ranks]:
        s.set_epoch(2)
    per_rank = [batches(s) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == n // (bs * world) == ranks[0].steps_per_epoch
    ref = batches(one)
    for step, global_batch in enumerate(ref):
        parts = [per_rank[r][step] for r in range(world)]
        assert all(len(p) == bs for p in parts)
        # Rank shares are disjoint and together are the single-process global batch (with seeds).
        assert sum(parts, []) == global_batch
    used = [i for b in ref for i, _ in b]
    assert len(set(used)) == len(used) == (n // (bs * world)) * bs * world  # a permutation


def test_sampler_without_drop_last_covers_everything():
    n, world, bs = 23, 2, 5
    ranks = [
        EpochBatchSampler(n, bs, replacement=False, seed=1, rank=r, world_size=world, drop_last=False)
        for r in range(world)
    ]
    got = [batches(s) for s in ranks]
    assert len(got[0]) == len(got[1]) == 3  # 24 padded positions: 10 + 10 + 4
    assert [len(b) for b in got[0]] == [5, 5, 2] == [len(b) for b in got[1]]
    idx = [i for r in got for b in r for i, _ in b]
    assert set(idx) == set(range(n)) and len(idx) == 24


def test_sampler_with_replacement_and_reproducibility():
    n = 200
    s = EpochBatchSampler(n, 50, replacement=True, seed=9)
    s.set_epoch(0)
    e0 = batches(s)
    idx = [i for b in e0 for i, _ in b]
    assert len(idx) == n and all(0 <= i < n for i in idx)
    assert len(set(idx)) < n  # draws repeat (P(no repeat) is astronomically small)
    assert batches(s) == e0  # same (seed, epoch) -> same batches
    again = EpochBatchSampler(n, 50, replacement=True, seed=9)
    again.set_epoch(0)
    assert batches(again) == e0
    s.set_epoch(1)
    assert batches(s) != e0
    other = EpochBatchSampler(n, 50, replacement=True, seed=10)
    assert batches(other) != e0
    seeds = [a for b in e0 for _, a in b]
    assert len(set(seeds)) == n and all(0 <= a < 2**63 for a in seeds)


def test_sampler_start_step_skips_exactly():
    s = EpochBatchSampler(100, 10, replacement=False, seed=0)
    s.set_epoch(4)
    full = batches(s)
    assert len(s) == 10 == s.steps_per_epoch
    s.set_epoch(4, start_step=7)
    assert len(s) == 3 and s.steps_per_epoch == 10
    assert batches(s) == full[7:]
    s.set_epoch(4, start_step=10)
    assert batches(s) == [] and len(s) == 0
    assert "cannot resume" in user_error(s.set_epoch, 4, 11)


def test_sampler_too_few_samples_is_a_user_error():
    msg = user_error(EpochBatchSampler, 10, 8, replacement=False, seed=0, world_size=2)
    assert "train.batch_size" in msg
