"""`interclr export`: torchvision safetensors (strict loading), TorchScript, ONNX, MoCo/torchvision import."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import TINY, assert_clean_error, run_cli
from safetensors import safe_open
from safetensors.torch import load_file

from interclr_cli.commands import backbone_fingerprint, load_backbone
from interclr_cli.commands.loading import save_classifier
from interclr_cli.config import load_config, to_mapping
from interclr_cli.methods import build_method
from interclr_cli.models import torchvision_resnet
from interclr_cli.training.checkpoint import save_training_checkpoint

SMALL = ["data.image_size=16", "data.eval_resize=16", "device=cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A pretrain-format checkpoint (MoCo v2, ResNet-18, projection head 64-32) with trained-like BN statistics."""
    cfg = load_config("mocov2-r18-cifar", ["data.root=unused", *TINY])
    torch.manual_seed(0)
    method = build_method(cfg, 16)
    method.train()
    with torch.no_grad():
        method.encoder_q(torch.randn(8, 3, 16, 16))
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.1)
    path = tmp_path_factory.mktemp("ck") / "ckpt.safetensors"
    save_training_checkpoint(
        path,
        model_state=method.state_dict(),
        extra_state={},
        optimizer=opt,
        config=to_mapping(cfg),
        epoch=1,
        step=2,
        step_in_epoch=0,
    )
    return path


@pytest.fixture
def cli():
    """``interclr ARGS`` in this process (conftest.run_cli): returncode, stdout, stderr."""
    return lambda *args: run_cli(*(str(a) for a in args))


def _export(cli, *args) -> dict:
    res = cli("export", *args, *SMALL, "--json", "-q")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_torchvision_export_loads_strictly_with_identical_outputs(cli, ckpt, tmp_path):
    out = tmp_path / "r18.safetensors"
    r = _export(cli, ckpt, "-o", out)
    assert r["path"] == str(out) and r["part"] == "backbone" and Path(r["json"]).is_file()
    backbone, _, _ = load_backbone(ckpt)
    tv = torchvision.models.resnet18()
    tv.fc = nn.Identity()
    tv.load_state_dict(load_file(out), strict=True)
    with torch.no_grad():
        assert torch.equal(tv.eval()(X), backbone(X))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "interclr-export" and meta["arch"] == "resnet18" and meta["small_stem"] == "false"
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["architecture"] == "resnet18" and side["includes_fc"] is False and side["meta"]["part"] == "backbone"
    # the export is itself a checkpoint for every command
    again, head, info = load_backbone(out)
    assert info.kind == "export" and head is None and info.classifier is None
    with torch.no_grad():
        assert torch.equal(again(X), backbone(X))
    # the output is not overwritten without --force
    assert_clean_error(cli("export", ckpt, "-o", out, *SMALL), 2, "--force")
    assert _export(cli, ckpt, "-o", out, "--force")["path"] == str(out)


def test_small_stem_export_loads_into_the_documented_helper(cli, tmp_path):
    out = tmp_path / "small.safetensors"
    _export(cli, "random:resnet18-small", "-o", out)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["small_stem"] is True and "3x3" in side["stem_note"] and "small_stem=True" in side["python_helper"]
    model = torchvision_resnet("resnet18", small_stem=True)
    model.fc = nn.Identity()
    model.load_state_dict(load_file(out), strict=True)
    backbone, _, _ = load_backbone("random:resnet18-small")
    with torch.no_grad():
        assert torch.equal(model.eval()(X), backbone(X))


def _classifier(ckpt: Path, path: Path, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    backbone, _, info = load_backbone(ckpt)
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(classes, 512, generator=g) * 0.1, torch.randn(classes, generator=g)
    save_classifier(
        path, w, b, info=info, fingerprint=backbone_fingerprint(backbone), classes=[f"c{i}" for i in range(classes)]
    )
    return w, b


def test_classifier_export_loads_strictly_into_torchvision(cli, ckpt, tmp_path):
    w, b = _classifier(ckpt, tmp_path / "classifier.safetensors")
    out = tmp_path / "cls.safetensors"
    r = _export(cli, ckpt, "--classifier", tmp_path / "classifier.safetensors", "-o", out)
    assert r["part"] == "classifier" and r["num_classes"] == 4
    tv = torchvision.models.resnet18(num_classes=4)
    tv.load_state_dict(load_file(out), strict=True)
    backbone, _, _ = load_backbone(ckpt)
    with torch.no_grad():
        assert torch.allclose(tv.eval()(X), backbone(X) @ w.T + b, atol=1e-5)
    assert json.loads(out.with_suffix(".json").read_text())["meta"]["classes"] == ["c0", "c1", "c2", "c3"]
    # a classifier trained on another backbone is refused
    assert_clean_error(
        cli(
            "export",
            "random:resnet18",
            "--classifier",
            tmp_path / "classifier.safetensors",
            "-o",
            tmp_path / "x.safetensors",
            *SMALL,
        ),
        2,
        "another backbone",
    )


@pytest.mark.parametrize(
    "fmt, part", [("torchscript", "embedding"), ("torchscript", "classifier"), ("onnx", "classifier")]
)
def test_traced_exports_match_pytorch(cli, ckpt, tmp_path, fmt, part):
    ort = pytest.importorskip("onnxruntime") if fmt == "onnx" else None
    w, b = _classifier(ckpt, tmp_path / "classifier.safetensors")
    backbone, head, _ = load_backbone(ckpt)
    with torch.no_grad():
        feats = backbone(X)
        expected = {"backbone": feats, "embedding": head(feats), "classifier": feats @ w.T + b}[part]
    out = tmp_path / f"{part}.{'pt' if fmt == 'torchscript' else 'onnx'}"
    args = ["--classifier", tmp_path / "classifier.safetensors"] if part == "classifier" else []
    r = _export(cli, ckpt, "--format", fmt, "--part", part, "-o", out, *args)
    assert r["output_dim"] == expected.shape[1] and Path(r["json"]).is_file()
    if fmt == "torchscript":
        with torch.no_grad():
            got = torch.jit.load(str(out)).eval()(X)
    else:
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"input": X.numpy()})[0])  # batch 3: the batch axis is dynamic
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_import_from_moco_and_torchvision(cli, tmp_path):
    # a MoCo v2 checkpoint as facebookresearch/moco writes it: encoder_q/encoder_k with an MLP fc, a queue
    torch.manual_seed(3)
    q = torchvision.models.resnet18(num_classes=128)
    q.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    q.train()
    with torch.no_grad():
        q(torch.randn(4, 3, 16, 16))
    sd = {f"module.encoder_q.{k}": v for k, v in q.state_dict().items()}
    sd.update({f"module.encoder_k.{k}": v.clone() for k, v in q.state_dict().items()})
    sd["module.queue"] = torch.randn(128, 64)
    moco = tmp_path / "moco_v2.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd}, moco)
    out = tmp_path / "moco.safetensors"
    r = _export(cli, "--from-moco", moco, "-o", out)
    assert r["part"] == "backbone"
    backbone, _, info = load_backbone(out)
    q.eval()
    q.fc = nn.Identity()
    with torch.no_grad():
        assert torch.equal(backbone(X), q(X))
    # the MoCo projection head survives a traced export
    emb = tmp_path / "moco-emb.onnx"
    assert _export(cli, "--from-moco", moco, "--format", "onnx", "--part", "embedding", "-o", emb)["output_dim"] == 128

    # torchvision weights with their fc: the classifier is kept, strict loading still works
    tv = torchvision.models.resnet18(num_classes=10).eval()
    pth = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), pth)
    out2 = tmp_path / "tv.safetensors"
    r = _export(cli, "--from-torchvision", pth, "-o", out2)
    assert r["part"] == "classifier" and r["num_classes"] == 10
    back = torchvision.models.resnet18(num_classes=10)
    back.load_state_dict(load_file(out2), strict=True)
    with torch.no_grad():
        assert torch.equal(back.eval()(X), tv(X))

    # a pickle holding arbitrary Python objects is refused by weights_only loading
    bad = tmp_path / "evil.pth"
    torch.save({"state_dict": tv.state_dict(), "obj": PurePosixPath("x")}, bad)
    assert_clean_error(
        cli("export", "--from-torchvision", bad, "-o", tmp_path / "e.safetensors", *SMALL), 2, "safe loading refuses"
    )


def test_export_errors(cli, ckpt, tmp_path):
    o = tmp_path / "o.safetensors"
    cases = [
        (["export", ckpt, "--part", "embedding", "-o", o], "--format torchscript or onnx"),
        (["export", ckpt, "--part", "classifier", "-o", o], "no classifier"),
        (["export", ckpt, "--format", "onnx", "-o", o], ".onnx"),
        (["export", ckpt, "--format", "tflite", "-o", o], "--format must be one of"),
        (["export", ckpt, "--from-moco", ckpt, "-o", o], "exactly one input"),
        (["export", "-o", o], "exactly one input"),
        (
            [
                "export",
                "random:resnet18",
                "--part",
                "embedding",
                "--format",
                "onnx",
                "-o",
                tmp_path / "e.onnx",
                "model.arch=resnet50",
            ],
            "model.arch=resnet50",
        ),
    ]
    for args, fragment in cases:
        assert_clean_error(cli(*args, *SMALL), 2, fragment)
    assert not o.exists()
