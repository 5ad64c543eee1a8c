"""Downstream commands end to end on tiny data: linear-eval, finetune, knn, cluster, rankme, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, assert_clean_error, make_tree, run_cli
from PIL import Image
from safetensors.torch import load_file, save_file
from scipy.optimize import linear_sum_assignment

from interclr_cli.commands import knn as knn_mod
from interclr_cli.commands import linear_probe, load_backbone, run_finetune, run_knn, run_rankme
from interclr_cli.commands.common import labelled_splits
from interclr_cli.commands.finetune import choose_subset
from interclr_cli.config import load_config
from interclr_cli.data import eval_transform, index_source
from interclr_cli.errors import UserError
from interclr_cli.eval.rankme import rankme
from interclr_cli.runtime.progress import Reporter
from interclr_cli.training.features import extract
from interclr_cli.training.rundir import MetricsLog

# Tiny settings for the downstream presets: 16 px, no workers, CPU.
SMALL = [
    "data.image_size=16",
    "data.eval_resize=16",
    "data.num_workers=0",
    "device=cpu",
    "train.batch_size=8",
    "eval.feature_batch_size=64",
    # float32: these tests compare with float32 computations and resume bit for bit (CPU bf16
    # kernels are not bit-reproducible across a resume; README "Precision")
    "train.precision=none",
]
LIN = "linear-r18-cifar"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """train/ (4 classes x 12) and test/ (4 x 4) real CIFAR images."""
    root = tmp_path_factory.mktemp("ds") / "data"
    make_tree(root / "train", 12)
    make_tree(root / "test", 4, split="test")
    return root


@pytest.fixture(scope="module")
def ckpt(data, tmp_path_factory) -> Path:
    """A real (tiny) pretrain checkpoint: MoCo v2, ResNet-18, 1 step."""
    from interclr_cli.commands.pretrain import run_pretrain

    out = tmp_path_factory.mktemp("pre") / "run"
    res = run_pretrain(
        "mocov2-r18-cifar",
        [f"data.root={data / 'train'}", "train.epochs=1", "train.max_steps=1", *TINY],
        out=str(out),
        resume=None,
        force=False,
        show_progress=False,
    )
    return Path(res["checkpoint"])


@pytest.fixture
def cli():
    """``interclr ARGS`` in this process (conftest.run_cli): returncode, stdout, stderr."""
    return lambda *args: run_cli(*(str(a) for a in args))


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- checkpoint loading ----------------------------------------------------------------------------


def test_load_backbone_reads_pretrain_and_random(ckpt):
    backbone, head, info = load_backbone(ckpt)
    assert info.kind == "pretrain" and info.arch == "resnet18" and info.small_stem is False
    assert info.image_size == 16 and info.embed_dim == 32 and head is not None
    saved = load_file(str(ckpt))
    assert torch.equal(backbone.layer4[1].bn2.running_var, saved["model.encoder_q.backbone.layer4.1.bn2.running_var"])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert backbone(x).shape == (2, 512) and head(backbone(x)).shape == (2, 32)
    a, ha, ia = load_backbone("random:resnet18-small")
    b, _, _ = load_backbone("random:resnet18-small")
    assert ia.small_stem and a.conv1.kernel_size == (3, 3) and ha is not None
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))  # fixed seed


def test_bad_checkpoints_are_one_line_errors(tmp_path, ckpt):
    pickle_file = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, pickle_file)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(foreign))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    cases = {
        tmp_path / "missing.safetensors": "does not exist",
        tmp_path: "is a folder",
        pickle_file: "--from-moco",
        foreign: "--from-torchvision",
        truncated: "not a readable safetensors",
        text: "not a readable safetensors",
        "random:vgg16": "random:resnet18",
    }
    for path, fragment in cases.items():
        with pytest.raises(UserError) as e:
            load_backbone(path)
        assert fragment in str(e.value) and "\n" not in str(e.value), (path, str(e.value))


def test_architecture_mismatch_names_both(cli, data, ckpt):
    res = cli("knn", ckpt, "--preset", LIN, f"data.root={data}", *SMALL, "model.arch=resnet50")
    assert_clean_error(res, 2, "model.arch=resnet50")
    assert "resnet18" in res.stderr
    # a pretraining preset says small_stem=true; the checkpoint has the standard stem
    res = cli("knn", ckpt, "--preset", "mocov2-r18-cifar", f"data.root={data}", *SMALL)
    assert_clean_error(res, 2, "model.small_stem=True")


def test_missing_data_is_a_one_line_error(cli, data, ckpt, tmp_path):
    assert_clean_error(cli("knn", ckpt, "--preset", LIN, *SMALL), 2, "data.root")  # the preset leaves data.root empty
    only_train = tmp_path / "only"
    make_tree(only_train / "train", 2, classes=2)
    assert_clean_error(
        cli("linear-eval", ckpt, f"data.root={only_train}", *SMALL, "--out", tmp_path / "r"), 2, "data.val"
    )
    assert not (tmp_path / "r").exists()  # nothing is created before the inputs are checked
    assert_clean_error(cli("rankme", ckpt, f"data.root={tmp_path / 'nowhere'}", *SMALL), 2, "does not exist")


# --- linear-eval -----------------------------------------------------------------------------------


def _synthetic(root: Path, size: int = 16) -> Path:
    """Three linearly separable classes: noisy red, green and blue squares."""
    rng = np.random.default_rng(0)
    colours = [(220, 30, 30), (30, 200, 40), (40, 50, 230)]
    for split, n in (("train", 8), ("val", 4)):
        for c, col in enumerate(colours):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                a = np.clip(np.array(col)[None, None] + rng.integers(-25, 26, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")
    return root


@pytest.mark.parametrize("cached", [True, False])
def test_linear_eval_separable_reaches_100_and_backbone_is_untouched(tmp_path, cached):
    root = _synthetic(tmp_path / "synth")
    cfg = load_config(
        LIN,
        [
            f"data.root={root}",
            *SMALL,
            "train.epochs=8",
            "optim.lr=0.1",
            f"eval.cached_features={cached}",
            "eval.cached_aug_copies=1",
        ],
    )
    backbone, _, _ = load_backbone("random:resnet18")
    before = _state(backbone)
    train, val = labelled_splits(cfg)
    fc, res = linear_probe(
        backbone, train, val, cfg, torch.device("cpu"), Reporter(enabled=False), MetricsLog(tmp_path / "m.jsonl")
    )
    assert res["top1"] == 100.0 and res["mode"] == ("cached-features" if cached else "augmented")
    assert len(res["history"]) == 8
    after = backbone.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert all(p.requires_grad for p in backbone.parameters())  # restored
    assert fc.weight.shape == (3, 512)


def test_linear_eval_cli_outputs(cli, data, ckpt, tmp_path):
    out = tmp_path / "lin"
    res = cli(
        "linear-eval",
        ckpt,
        "--preset",
        LIN,
        f"data.root={data}",
        *SMALL,
        "train.epochs=2",
        "--cached-features",
        "--out",
        out,
        "--json",
        "-q",
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert {"top1", "top5", "checkpoint"} <= set(summary) and summary["mode"] == "cached-features"
    assert 0 <= summary["top1"] <= summary["top5"] <= 100
    epochs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["type"] == "epoch"] == [1, 2]
    clf = load_file(summary["checkpoint"])
    assert clf["weight"].shape == (4, 512) and clf["bias"].shape == (4,)
    assert (out / "config.yaml").is_file() and not (out / "checkpoints").exists()
    # the same folder again is refused, --force redoes it
    assert_clean_error(
        cli("linear-eval", ckpt, "--preset", LIN, f"data.root={data}", *SMALL, "--out", out), 2, "already exists"
    )


# --- finetune --------------------------------------------------------------------------------------


def test_label_fraction_is_stratified_and_reproducible(data):
    cfg = load_config("finetune-r18-cifar", [f"data.root={data}", "data.label_fraction=0.25", "seed=3"])
    train, _ = labelled_splits(cfg)
    a, how = choose_subset(train, cfg)
    b, _ = choose_subset(train, cfg)
    assert np.array_equal(a, b) and "stratified" in how
    assert np.bincount(np.asarray(train.labels)[a]).tolist() == [3, 3, 3, 3]
    cfg.seed = 4
    assert not np.array_equal(choose_subset(train, cfg)[0], a)


def test_label_fraction_and_list_errors(cli, data, ckpt, tmp_path):
    for bad in ("0", "1.5", "-0.1"):
        assert_clean_error(cli("finetune", ckpt, f"data.root={data}", *SMALL, "--label-fraction", bad), 2, "(0, 1]")
    assert_clean_error(cli("finetune", ckpt, f"data.root={data}", *SMALL, "data.label_fraction=2"), 2, "(0, 1]")
    lst = tmp_path / "list.txt"
    lst.write_text("airplane/0000.jpg\nno-such-file.jpg\n")
    assert_clean_error(cli("finetune", ckpt, f"data.root={data}", *SMALL, "--label-list", lst), 2, "not in the dataset")


def test_finetune_resume_equals_uninterrupted(data, ckpt, tmp_path):
    ov = [f"data.root={data}", *SMALL, "data.label_fraction=0.5", "optim.head_lr_mult=10"]
    full = run_finetune(
        str(ckpt), "finetune-r18-cifar", ov + ["train.epochs=2"], out=str(tmp_path / "a"), show_progress=False
    )
    assert full["epochs"] == 2 and full["steps"] == 6 and full["num_labelled"] == 24
    assert {"top1", "top5", "checkpoint"} <= set(full)
    lines = [
        ln.split() for ln in (tmp_path / "a" / "label_subset.txt").read_text().splitlines() if not ln.startswith("#")
    ]
    assert len(lines) == 24 and np.bincount([int(ln[-1]) for ln in lines]).tolist() == [6, 6, 6, 6]
    run_finetune(str(ckpt), "finetune-r18-cifar", ov + ["train.epochs=1"], out=str(tmp_path / "b"), show_progress=False)
    resumed = run_finetune(
        None, None, ["train.epochs=2"], out=str(tmp_path / "b"), resume="__latest__", show_progress=False
    )
    ta, tb = load_file(full["checkpoint"]), load_file(resumed["checkpoint"])
    model = [k for k in ta if k.startswith(("model.", "optim."))]
    assert model and all(torch.equal(ta[k], tb[k]) for k in model)
    assert resumed["top1"] == full["top1"]
    # the whole network trains in train mode: BatchNorm counted the 6 steps on top of pretraining's
    src = load_file(str(ckpt))
    for bn in ("bn1", "layer4.1.bn2"):
        before = int(src[f"model.encoder_q.backbone.{bn}.num_batches_tracked"])
        assert int(ta[f"model.backbone.{bn}.num_batches_tracked"]) == before + 6
    # the fine-tuned checkpoint is itself a checkpoint for the other commands (with its classifier)
    backbone, head, info = load_backbone(full["checkpoint"])
    assert info.kind == "finetune" and head is None and info.classifier["weight"].shape == (4, 512)
    assert info.classes == ["airplane", "automobile", "bird", "cat"]


# --- knn -------------------------------------------------------------------------------------------


def test_knn_matches_direct_computation(data, tmp_path, monkeypatch):
    monkeypatch.setattr(knn_mod, "BLOCK_BYTES", 4 * 48 * 3)  # 3 val rows per chunk
    res = run_knn(
        "random:resnet18",
        LIN,
        [f"data.root={data}", *SMALL, "eval.knn_k=[1,5,20]"],
        out=str(tmp_path / "k"),
        force=False,
        show_progress=False,
    )
    assert set(res["top1"]) == {"1", "5", "20"}
    cfg = load_config(LIN, [f"data.root={data}", *SMALL])
    backbone, _, _ = load_backbone("random:resnet18")
    tr = index_source(str(data / "train"), "imagefolder")
    va = index_source(str(data / "test"), "imagefolder")
    (ftr,), ltr = extract(backbone, tr, eval_transform(cfg.data), device=torch.device("cpu"), num_workers=0)
    (fva,), lva = extract(backbone, va, eval_transform(cfg.data), device=torch.device("cpu"), num_workers=0)
    sim = F.normalize(fva.double(), dim=1) @ F.normalize(ftr.double(), dim=1).T
    for k in (1, 5, 20):
        correct = 0
        for i in range(sim.shape[0]):  # the textbook definition, one query at a time
            s, j = sim[i].topk(k)
            votes = torch.zeros(4, dtype=torch.float64).index_add_(0, ltr[j], (s / 0.07).exp())
            correct += int(votes.argmax() == lva[i])
        assert res["top1"][str(k)] == pytest.approx(100.0 * correct / sim.shape[0])


def test_knn_k_larger_than_train_set_is_an_error(cli, data, tmp_path):
    assert_clean_error(
        cli("knn", "random:resnet18", f"data.root={data}", *SMALL, "--k", "500", "--out", tmp_path / "k"),
        2,
        "smaller --k",
    )


# --- cluster ---------------------------------------------------------------------------------------


def test_cluster_outputs_and_metrics(cli, data, ckpt, tmp_path):
    out = tmp_path / "cl"
    res = cli(
        "cluster",
        ckpt,
        f"data.root={data}",
        *SMALL,
        "--k",
        "4",
        "--pca",
        "8",
        "--sheet-images",
        "3",
        "--out",
        out,
        "--json",
        "-q",
    )
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["k"] == 4 and {"nmi", "ari", "ami", "purity", "accuracy", "assignments"} <= set(r)
    with open(r["assignments"]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "cluster", "distance"] and len(rows) == 49
    classes = ["airplane", "automobile", "bird", "cat"]
    truth = np.array([classes.index(Path(p).parent.name) for p, _, _ in rows[1:]])
    pred = np.array([int(c) for _, c, _ in rows[1:]])
    assert set(pred) <= set(range(4)) and all(float(d) >= 0 for _, _, d in rows[1:])
    table = np.zeros((4, 4))
    np.add.at(table, (truth, pred), 1)
    assert r["purity"] == pytest.approx(table.max(axis=0).sum() / 48)
    i, j = linear_sum_assignment(-table)
    assert r["accuracy"] == pytest.approx(table[i, j].sum() / 48)
    cents = load_file(r["centroids"])
    assert cents["centroids"].shape == (4, 8) and cents["pca.components"].shape == (8, 512)
    with Image.open(r["sheet"]) as im:
        assert im.size[1] == 2 + 4 * (64 + 2)  # one row per cluster
    # an unlabelled folder needs --k; --k beyond the image count and a missing head are errors
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((data / "test" / "cat").iterdir())[:3]:
        (flat / p.name).write_bytes(p.read_bytes())
    assert_clean_error(cli("cluster", ckpt, f"data.root={flat}", *SMALL), 2, "--k")
    assert_clean_error(cli("cluster", ckpt, f"data.root={flat}", *SMALL, "--k", "5"), 2, "between 1 and")


# --- rankme ----------------------------------------------------------------------------------------


def test_rankme_matches_direct_computation(data, ckpt, tmp_path):
    res = run_rankme(
        str(ckpt),
        LIN,
        [f"data.root={data}", *SMALL, "monitor.rankme_samples=30"],
        out=str(tmp_path / "r"),
        force=False,
        show_progress=False,
    )
    assert res["num_images"] == 30 and 1.0 <= res["rankme_embedding"] <= 30 and 1.0 <= res["rankme_backbone"] <= 30
    backbone, head, _ = load_backbone(ckpt)
    cfg = load_config(LIN, [f"data.root={data}", *SMALL])
    index = index_source(str(data / "train"), "imagefolder")
    from interclr_cli.training.features import subset_index

    pos = np.sort(np.random.default_rng(12345).permutation(48)[:30])
    (f, e), _ = extract(
        lambda x: (backbone(x), head(backbone(x))),
        subset_index(index, pos),
        eval_transform(cfg.data),
        device=torch.device("cpu"),
        num_workers=0,
    )
    assert res["rankme_backbone"] == pytest.approx(rankme(f)) and res["rankme_embedding"] == pytest.approx(rankme(e))


def test_help_lists_the_downstream_commands(cli):
    res = cli("--help")
    assert res.returncode == 0
    for cmd in ("linear-eval", "finetune", "knn", "cluster", "rankme", "export"):
        assert cmd in res.stdout
    res = cli("knn", "--help")
    assert res.returncode == 0 and "random:" in res.stdout and "Examples" in res.stdout
