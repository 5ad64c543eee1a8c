import argparse
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import assert_clean_error
from safetensors.torch import load_file

from interclr_cli.errors import UserError
from interclr_cli.models import build_backbone, torchvision_resnet
from interclr_cli.models.export import (
    backbone_state_dict,
    convert_moco_checkpoint,
    export_onnx,
    export_torchscript,
    infer_arch,
    read_pickle_checkpoint,
    write_torchvision_export,
)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


pytestmark = pytest.mark.usefixtures("one_thread")


def trained_like(module: nn.Module) -> nn.Module:
    """Non-trivial BN statistics so that buffers matter in the comparisons."""
    torch.manual_seed(0)
    module.train()
    with torch.no_grad():
        for _ in range(2):
            module(torch.randn(4, 3, 32, 32))
    return module.eval()


@pytest.fixture(scope="module")
def backbone():
    return trained_like(build_backbone("resnet18", small_stem=False)[0])


@pytest.fixture(scope="module")
def small_backbone():
    return trained_like(build_backbone("resnet18", small_stem=True)[0])


def test_backbone_state_dict_is_torchvision_named_and_cloned(backbone):
    state = backbone_state_dict(backbone)
    assert not any(k.startswith("fc.") for k in state)
    assert set(state) == {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    assert all(v.is_contiguous() for v in state.values())
    state["conv1.weight"].zero_()
    assert backbone.conv1.weight.abs().sum() > 0
    wrapped = nn.Module()
    wrapped.module = backbone  # as DistributedDataParallel names it
    assert set(backbone_state_dict(wrapped)) == set(state)


def test_export_without_fc_loads_into_torchvision(tmp_path: Path, backbone):
    out = tmp_path / "exp" / "backbone.safetensors"
    meta_path = write_torchvision_export(
        backbone_state_dict(backbone),
        out,
        arch="resnet18",
        small_stem=False,
        image_size=224,
        mean=MEAN,
        std=STD,
        fc=None,
        extra_meta={"epoch": 200},
    )
    assert meta_path == out.with_suffix(".json") and out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["backbone.json", "backbone.safetensors"]  # no temp files
    tv = torchvision.models.resnet18()
    result = tv.load_state_dict(load_file(out), strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []
    tv.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(tv.eval()(x), backbone.eval()(x))
    meta = json.loads(meta_path.read_text())
    assert meta["architecture"] == "resnet18" and meta["small_stem"] is False
    assert meta["includes_fc"] is False and meta["num_classes"] is None
    assert meta["preprocessing"]["resize"] == 256 and meta["preprocessing"]["crop"] == 224
    assert meta["preprocessing"]["mean"] == MEAN and meta["preprocessing"]["std"] == STD
    assert meta["meta"] == {"epoch": 200}
    assert "stem_note" not in meta


def test_export_with_fc_loads_strict(tmp_path: Path, backbone):
    head = nn.Linear(512, 10)
    out = tmp_path / "classifier.safetensors"
    write_torchvision_export(
        backbone_state_dict(backbone),
        out,
        arch="resnet18",
        small_stem=False,
        image_size=224,
        mean=MEAN,
        std=STD,
        fc={"weight": head.weight, "bias": head.bias},
        extra_meta={},
    )
    tv = torchvision.models.resnet18(num_classes=10)
    tv.load_state_dict(load_file(out), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(tv.eval()(x), head(backbone.eval()(x)), atol=1e-6)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["includes_fc"] is True and meta["num_classes"] == 10


def test_small_stem_export_describes_the_stem(tmp_path: Path, small_backbone):
    backbone = small_backbone
    out = tmp_path / "small.safetensors"
    write_torchvision_export(
        backbone_state_dict(backbone),
        out,
        arch="resnet18",
        small_stem=True,
        image_size=32,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        fc=None,
        extra_meta={},
    )
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["small_stem"] is True
    assert "3x3" in meta["stem_note"] and "stride 1" in meta["stem_note"] and "max-pool" in meta["stem_note"]
    assert "torchvision_resnet('resnet18', small_stem=True)" in meta["python_helper"]
    assert meta["preprocessing"]["resize"] == 32 and meta["preprocessing"]["crop"] == 32
    model = torchvision_resnet("resnet18", small_stem=True)
    missing = model.load_state_dict(load_file(out), strict=False).missing_keys
    assert missing == ["fc.weight", "fc.bias"]
    model.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), backbone.eval()(x))


def test_export_rejects_mismatched_weights(tmp_path: Path, small_backbone):
    state = backbone_state_dict(small_backbone)
    with pytest.raises(UserError, match="conv1.weight has shape"):
        write_torchvision_export(
            state,
            tmp_path / "a.safetensors",
            arch="resnet18",
            small_stem=False,
            image_size=224,
            mean=MEAN,
            std=STD,
            fc=None,
            extra_meta={},
        )
    with pytest.raises(UserError, match="missing"):
        write_torchvision_export(
            state,
            tmp_path / "a.safetensors",
            arch="resnet34",
            small_stem=True,
            image_size=32,
            mean=MEAN,
            std=STD,
            fc=None,
            extra_meta={},
        )
    with pytest.raises(UserError, match=".safetensors"):
        write_torchvision_export(
            state,
            tmp_path / "a.pt",
            arch="resnet18",
            small_stem=True,
            image_size=32,
            mean=MEAN,
            std=STD,
            fc=None,
            extra_meta={},
        )
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def classifier(small_backbone):
    torch.manual_seed(1)
    return nn.Sequential(small_backbone, nn.Linear(512, 7)).eval()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_matches(tmp_path: Path, classifier):
    out = export_torchscript(classifier, torch.randn(2, 3, 32, 32), tmp_path / "m.pt")
    loaded = torch.jit.load(str(out))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (loaded(x) - classifier(x)).abs().max() < 1e-4


def test_onnx_matches_with_dynamic_batch(tmp_path: Path, classifier):
    ort = pytest.importorskip("onnxruntime")
    classifier.train()
    out = export_onnx(classifier, torch.randn(2, 3, 32, 32), tmp_path / "m.onnx")
    assert classifier.training  # the mode is restored
    classifier.eval()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        got = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            want = classifier(x).numpy()
        assert got.shape == (batch, 7)
        assert np.abs(got - want).max() < 1e-4


def _file_size_limit(limit: int):
    """A ``preexec_fn``: files may grow to ``limit`` bytes; a longer write fails with EFBIG (the
    kernel's own write error, like a full disk: SIGXFSZ ignored so the process sees the error)."""

    def apply() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("fmt,suffix", [("torchscript", ".pt"), ("onnx", ".onnx")])
def test_a_write_error_while_exporting_is_one_line_and_leaves_nothing(tmp_path: Path, fmt, suffix):
    """A real kernel write error (file size limit: 1 MB, the ResNet-18 export is ~45 MB) in a real
    process. torch's own file writers abort the process on it (``Fatal Python error: Aborted``, as
    a full CI disk showed); the exporters serialise in memory and write through our atomic writer,
    so the command ends with the storage error's one line, exit code 1, and no file."""
    out = tmp_path / f"m{suffix}"
    args = ["export", "random:resnet18-small", "--format", fmt, "-o", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "INTERCLR_DEBUG"}
    res = subprocess.run(
        [sys.executable, "-m", "interclr_cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        preexec_fn=_file_size_limit(2**20),
    )
    assert_clean_error(res, 1, os.strerror(errno.EFBIG))
    assert str(out) in res.stderr
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


# ----------------------------------------------------------------------------- foreign checkpoints


def moco_state(arch="resnet18", hidden=512):
    """A MoCo v2 DistributedDataParallel state dict: encoder_q/encoder_k with an MLP fc, and the queue."""
    state = {}
    for enc in ("encoder_q", "encoder_k"):
        model = torchvision.models.__dict__[arch](num_classes=128)
        dim = model.fc.weight.shape[1]
        model.fc = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), model.fc)
        state.update({f"module.{enc}.{k}": v for k, v in model.state_dict().items()})
    state["module.queue"] = torch.randn(128, 16)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return state


def test_read_and_convert_moco_checkpoint(tmp_path: Path):
    state = moco_state()
    path = tmp_path / "checkpoint_0199.pth.tar"
    torch.save(
        {
            "epoch": 200,
            "arch": "resnet18",
            "state_dict": state,
            "optimizer": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(lr=0.03),
        },
        path,
    )
    ckpt = read_pickle_checkpoint(path)
    assert ckpt["epoch"] == 200 and ckpt["args"].lr == 0.03
    backbone, head, arch = convert_moco_checkpoint(ckpt)
    assert arch == "resnet18"
    assert sorted(head) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert head["2.weight"].shape == (128, 512)
    assert torch.equal(backbone["conv1.weight"], state["module.encoder_q.conv1.weight"])
    tv = torchvision.models.resnet18()
    assert tv.load_state_dict(backbone, strict=False).missing_keys == ["fc.weight", "fc.bias"]


def test_convert_plain_torchvision_and_ddp():
    for arch in ("resnet34", "resnet50"):
        with torch.device("meta"):  # shapes are all that matter here
            state = torchvision.models.__dict__[arch](num_classes=10).state_dict()
        backbone, head, guessed = convert_moco_checkpoint(state)
        assert guessed == arch and sorted(head) == ["bias", "weight"]
        assert "fc.weight" not in backbone and len(backbone) == len(state) - 2
    ddp = {f"module.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}
    assert convert_moco_checkpoint({"model": ddp})[2] == "resnet18"
    small = torchvision_resnet("resnet18", small_stem=True).state_dict()
    del small["fc.weight"], small["fc.bias"]
    backbone, head, arch = convert_moco_checkpoint(small)
    assert head is None and infer_arch(backbone) == ("resnet18", True)


def test_convert_rejects_other_checkpoints():
    with pytest.raises(UserError, match="no ResNet backbone"):
        convert_moco_checkpoint({"encoder.weight": torch.zeros(3)})
    with torch.device("meta"):
        deep = torchvision.models.resnet101().state_dict()
    with pytest.raises(UserError, match=r"unsupported ResNet .*\(3, 4, 23, 3\)"):
        convert_moco_checkpoint(deep)
    broken = torchvision.models.resnet18().state_dict()
    del broken["layer2.0.bn1.running_var"]
    with pytest.raises(UserError, match="1 keys missing"):
        convert_moco_checkpoint(broken)


class Custom:
    pass


def test_read_pickle_checkpoint_errors(tmp_path: Path):
    with pytest.raises(UserError, match="not found"):
        read_pickle_checkpoint(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        read_pickle_checkpoint(garbage)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"obj": Custom()}, unsafe)
    with pytest.raises(UserError, match="safe loading refuses") as e:
        read_pickle_checkpoint(unsafe)
    assert "\n" not in str(e.value)
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(2), tensor_only)
    with pytest.raises(UserError, match="not a dict"):
        read_pickle_checkpoint(tensor_only)
