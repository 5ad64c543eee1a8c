"""``auto`` precision / memory format / data path: the decision rules with injected capabilities,
the config round trip, what stays float32 under CPU bf16 autocast, bf16 extraction vs fp32 on
the built-in data, and ``train.compile`` on a tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from interclr_cli.config import load_config
from interclr_cli.config.loader import to_yaml
from interclr_cli.errors import UserError
from interclr_cli.methods import build_method
from interclr_cli.runtime.precision import (
    Caps,
    configure_cuda_backends,
    cpu_caps,
    jpeg_share,
    resolve_augment_on,
    resolve_channels_last,
    resolve_decode,
    resolve_precision,
)
from interclr_cli.training.autochoice import channels_last_on, extraction_precision, resolve_auto
from interclr_cli.training.optim import build_optimizer

NO_BF16 = Caps(name="old x86", avx512=False, avx512_bf16=False, amx=False)
AVX512_ONLY = Caps(name="skylake", avx512=True)
ZEN4 = Caps(name="zen4", avx512=True, avx512_bf16=True)
SAPPHIRE = Caps(name="spr", avx512=True, avx512_bf16=True, amx=True)
NO_ONEDNN = Caps(name="zen4 without oneDNN", avx512=True, avx512_bf16=True, mkldnn=False)
H100 = Caps(name="H100", cuda_bf16=True)
V100 = Caps(name="V100", cuda_bf16=False)
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "device_type, caps, expected",
    [
        ("cpu", NO_BF16, "none"),
        ("cpu", AVX512_ONLY, "none"),  # AVX-512 without bf16 would emulate it: slower than fp32
        ("cpu", ZEN4, "bf16"),
        ("cpu", SAPPHIRE, "bf16"),
        ("cpu", NO_ONEDNN, "none"),
        ("cuda", H100, "bf16"),
        ("cuda", V100, "none"),
        ("mps", ZEN4, "none"),  # another device: the CPU's bf16 says nothing about it
    ],
)
def test_auto_precision_rules(device_type, caps, expected):
    value, reason = resolve_precision("auto", device_type, caps)
    assert value == expected and reason
    # an explicit value always wins, whatever the machine
    for explicit in ("none", "bf16"):
        assert resolve_precision(explicit, device_type, caps) == (explicit, "set in the config")


@pytest.mark.parametrize(
    "device_type, caps, expected",
    [("cpu", NO_BF16, "false"), ("cpu", AVX512_ONLY, "true"), ("cpu", NO_ONEDNN, "false"), ("cuda", V100, "true")],
)
def test_auto_channels_last_rules(device_type, caps, expected):
    assert resolve_channels_last("auto", device_type, caps)[0] == expected
    assert resolve_channels_last("false", device_type, SAPPHIRE)[0] == "false"
    if device_type == "cpu":  # several CPU processes stay contiguous
        assert resolve_channels_last("auto", "cpu", ZEN4, world=2)[0] == "false"
    assert resolve_channels_last("true", device_type, NO_BF16)[0] == "true"


def test_auto_data_path_rules_keep_the_cpu_defaults():
    # the CPU: today's defaults (PIL in the workers), unless another key needs the device
    assert resolve_augment_on("auto", "cpu", in_memory=False, decode="auto")[0] == "workers"
    assert resolve_augment_on("auto", "cpu", in_memory=True, decode="auto")[0] == "device"
    assert resolve_augment_on("auto", "cpu", in_memory=False, decode="device")[0] == "device"
    assert resolve_decode("auto", "cpu", augment_on="device", jpeg_share=1.0)[0] == "pil"
    # CUDA: device augmentation; device decoding for JPEG data only
    assert resolve_augment_on("auto", "cuda", in_memory=False, decode="auto")[0] == "device"
    assert resolve_decode("auto", "cuda", augment_on="device", jpeg_share=0.9)[0] == "device"
    assert resolve_decode("auto", "cuda", augment_on="device", jpeg_share=0.2)[0] == "pil"
    assert resolve_decode("auto", "cuda", augment_on="workers", jpeg_share=1.0)[0] == "pil"
    assert resolve_augment_on("workers", "cuda", in_memory=False, decode="auto")[0] == "workers"
    assert resolve_decode("pil", "cuda", augment_on="device", jpeg_share=1.0)[0] == "pil"


def test_jpeg_share_counts_suffixes():
    assert jpeg_share([]) == 0.0
    assert jpeg_share(["a.jpg", "b.JPEG", "c.png", "d.webp"]) == 0.5
    is_jpeg = np.random.default_rng(0).random(20_000) < 0.75  # a sample of 1,000 of 20,000 names
    paths = [f"{i}.{'jpg' if j else 'png'}" for i, j in enumerate(is_jpeg)]
    assert jpeg_share(paths, sample=1000) == pytest.approx(is_jpeg.mean(), abs=0.05)


def test_cpu_caps_agree_with_proc_cpuinfo():
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = set()
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    caps = cpu_caps()
    assert caps.avx512_bf16 == ("avx512_bf16" in flags)
    assert caps.amx == ("amx_tile" in flags)
    assert caps.avx512 == ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags)
    assert caps.name in caps.line() and ("AVX-512 bf16 yes" in caps.line()) == caps.avx512_bf16


def test_channels_last_keeps_reading_booleans():
    assert load_config(None).train.channels_last == "auto"
    for given, expected in [("true", "true"), ("True", "true"), ("yes", "true"), ("1", "true"), ("off", "false")]:
        assert load_config(None, [f"train.channels_last={given}"]).train.channels_last == expected
    assert load_config(None, ["train.channels_last=auto"]).train.channels_last == "auto"
    with pytest.raises(UserError, match=r"train.channels_last must be one of auto, true, false; got 'maybe'"):
        load_config(None, ["train.channels_last=maybe"])
    # a config.yaml of an older run (YAML booleans) reads back the same
    from interclr_cli.config.loader import config_from_mapping

    assert config_from_mapping({"train": {"channels_last": True}}).train.channels_last == "true"
    assert config_from_mapping({"train": {"channels_last": False}}).train.channels_last == "false"
    with pytest.raises(UserError, match="train.precision must be one of auto, none, bf16"):
        load_config(None, ["train.precision=fp16"])


def test_resolve_auto_writes_the_choice_back_and_keeps_explicit_values(caplog):
    cfg = load_config(None, ["device=cpu"])
    with caplog.at_level("INFO", logger="interclr"):
        chosen = resolve_auto(cfg, CPU, ["a.jpg"], caps=ZEN4)
    assert (cfg.train.precision, cfg.train.channels_last, cfg.eval.precision) == ("bf16", "true", "bf16")
    assert (cfg.data.augment_on, cfg.data.decode) == ("workers", "pil")  # CPU defaults unchanged
    assert set(chosen) == {"train.precision", "train.channels_last", "eval.precision", "data.augment_on", "data.decode"}
    assert "train.precision=bf16 (the CPU has AVX-512 bf16)" in caplog.text
    # resolved values are final: a second call (a resumed run) changes nothing on any machine
    assert resolve_auto(cfg, CPU, ["a.jpg"], caps=NO_BF16) == {}
    assert cfg.train.precision == "bf16"
    # the config.yaml text records the resolved values, and reads back to them
    back = yaml.safe_load(to_yaml(cfg))
    assert back["train"]["precision"] == "bf16" and back["train"]["channels_last"] == "true"
    explicit = load_config(None, ["train.precision=none", "train.channels_last=false", "eval.precision=bf16"])
    resolve_auto(explicit, CPU, caps=SAPPHIRE)
    assert (explicit.train.precision, explicit.train.channels_last, explicit.eval.precision) == (
        "none",
        "false",
        "bf16",
    )
    assert not channels_last_on(explicit) and channels_last_on(cfg)


def test_extraction_precision_follows_train_unless_eval_overrides():
    cfg = load_config(None, ["train.precision=bf16"])
    assert extraction_precision(cfg, CPU) == "bf16"
    cfg.eval.precision = "none"
    assert extraction_precision(cfg, CPU) == "none"
    auto = load_config(None)
    expected = resolve_precision("auto", "cpu", cpu_caps())[0]
    assert extraction_precision(auto, CPU) == expected  # unresolved: decided for the device


def test_cuda_backends_are_left_alone_on_the_cpu():
    before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert configure_cuda_backends(CPU, cudnn_benchmark=True, tf32=True) == []
    after = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert before == after


def test_pretrain_run_records_the_resolved_choice(tiny_data, tmp_path):
    from conftest import TINY

    from interclr_cli.commands.pretrain import run_pretrain

    out = tmp_path / "run"
    run_pretrain("quickstart", TINY + [f"data.root={tiny_data / 'train'}", "train.max_steps=1"], out=str(out),
                 resume=None, force=False, show_progress=False)  # fmt: skip
    saved = yaml.safe_load((out / "config.yaml").read_text())
    caps = cpu_caps()
    assert saved["train"]["precision"] == resolve_precision("auto", "cpu", caps)[0]
    assert saved["train"]["channels_last"] == resolve_channels_last("auto", "cpu", caps)[0]
    assert saved["eval"]["precision"] == saved["train"]["precision"]
    assert saved["data"]["augment_on"] == "device" and saved["data"]["decode"] == "pil"  # quickstart; CPU


# --- what stays float32 under CPU bf16 autocast ------------------------------------------------


def _tiny_method(name: str):
    torch.manual_seed(0)
    over = ["model.arch=resnet18", "model.head_hidden=32", "model.embed_dim=8", "method.queue_size=16"]
    if name == "interclr":
        over += ["method.inter.num_clusters=4", "method.inter.num_negatives=8", "method.inter.min_cluster_size=1"]
    cfg = load_config("mocov2-r18-cifar", over + [f"method.name={name}"])
    return build_method(cfg, 64), cfg


def test_bn_statistics_optimizer_state_and_loss_stay_float32_under_bf16():
    m, cfg = _tiny_method("mocov2")
    m.train()
    opt = build_optimizer(cfg.optim, [{"params": m.trainable_parameters()}], 0.1)
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    before = [bn.running_mean.clone() for bn in bns]
    g = torch.Generator().manual_seed(1)
    batch = {
        "view1": torch.randn(8, 3, 16, 16, generator=g),
        "view2": torch.randn(8, 3, 16, 16, generator=g),
        "index": torch.arange(8),
        "label": torch.zeros(8, dtype=torch.long),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = m.training_step(batch, 0, 0)
        probe = m.encoder_q.backbone.conv1(batch["view1"])
    assert probe.dtype == torch.bfloat16  # the region really computes convolutions in bf16
    assert loss.dtype == torch.float32
    opt.zero_grad()
    loss.backward()
    opt.step()
    m.after_optimizer_step(0)
    for bn in bns:
        assert bn.running_mean.dtype == torch.float32 and bn.running_var.dtype == torch.float32
    assert any(not torch.equal(bn.running_mean, b0) for bn, b0 in zip(bns, before))  # they were updated
    for p in m.parameters():
        assert p.dtype == torch.float32
        if p.grad is not None:
            assert p.grad.dtype == torch.float32
    states = [s for s in opt.state.values() if "momentum_buffer" in s]
    assert states and all(s["momentum_buffer"].dtype == torch.float32 for s in states)
    assert m.queue.dtype == torch.float32


# --- bf16 extraction vs fp32 on the built-in data ----------------------------------------------

# Tolerances, in top-1 points, of a bf16 extraction against fp32 (1,000 train / 500 val images of
# builtin:cifar10-mini, a seeded random ResNet-18, 32 px): each query's neighbours may reorder
# where bf16's 8-bit mantissa ties two similarities. Measured on an AVX-512 bf16 CPU: kNN (k=20)
# 26.0 fp32 vs 25.8 bf16; linear 30 epochs on normalised features 27.8 vs 28.0 (lr 1.0, constant).
KNN_TOL, LINEAR_TOL, COSINE_MIN = 1.5, 1.5, 0.995


def test_bf16_extraction_matches_fp32_knn_and_linear():
    from interclr_cli.data import index_source
    from interclr_cli.data.builtin import resolve_builtin
    from interclr_cli.eval.knn import knn_top1
    from interclr_cli.eval.linear import train_linear_on_features
    from interclr_cli.models import build_backbone
    from interclr_cli.training.features import extract_with_config, subset_index

    root = Path(resolve_builtin("cifar10-mini"))
    rng = np.random.default_rng(0)
    train_all, val_all = index_source(str(root / "train"), "auto"), index_source(str(root / "test"), "auto")
    train = subset_index(train_all, np.sort(rng.permutation(len(train_all))[:1000]))
    val = subset_index(val_all, np.sort(rng.permutation(len(val_all))[:500]))
    torch.manual_seed(0)
    net, _ = build_backbone("resnet18", small_stem=False)
    net.eval()
    feats = {}
    for precision in ("none", "bf16"):
        cfg = load_config(None, ["data.image_size=32", "data.eval_resize=32", "data.num_workers=0",
                                 "train.channels_last=false", f"eval.precision={precision}"])  # fmt: skip
        (tf,), tl = extract_with_config(net, train, cfg, CPU, None, "train")
        (vf,), vl = extract_with_config(net, val, cfg, CPU, None, "val")
        feats[precision] = (tf, tl, vf, vl)
    tf32, tfb = feats["none"][0], feats["bf16"][0]
    assert not torch.equal(tf32, tfb)  # the bf16 pass really ran in bf16
    cos = torch.nn.functional.cosine_similarity(tf32.double(), tfb.double(), dim=1)
    assert cos.min() > COSINE_MIN
    knn = {p: knn_top1(f[0], f[1], f[2], f[3], [20], num_classes=10)[20] for p, f in feats.items()}
    assert knn["none"] > 15.0  # well above chance (10%): the comparison means something
    assert abs(knn["bf16"] - knn["none"]) <= KNN_TOL
    linear = {}  # on L2-normalised features (a random net's raw ones make SGD's last epoch erratic)
    cosine_lr = lambda e: 0.5 * (1 + math.cos(math.pi * e / 30))  # noqa: E731
    for p, (a, b, c, d) in feats.items():
        a, c = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(c, dim=1)
        _, res = train_linear_on_features(
            a, b, c, d, 10, epochs=30, lr_at=cosine_lr, momentum=0.9, weight_decay=0.0, batch_size=128, seed=0
        )
        linear[p] = res["top1"]
    assert linear["none"] > 15.0
    assert abs(linear["bf16"] - linear["none"]) <= LINEAR_TOL


# --- train.compile -------------------------------------------------------------------------------


def _tiny_backbone(width: int) -> nn.Module:
    """conv - BN - ReLU - pool - linear to the ResNet-18 feature width: a few kernels to compile."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, width),
    )  # fmt: skip


def test_compile_runs_a_tiny_step_on_the_cpu_and_matches_eager():
    """``train.compile`` (``Method.compile_networks``): a MoCo v2 step whose encoders carry a tiny
    backbone gives the eager loss and gradients (float32) once compiled by inductor."""
    import copy
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("g++") is None:
        pytest.skip("torch.compile on the CPU needs a C compiler")
    methods = []
    for _ in range(2):
        m, _ = _tiny_method("mocov2")
        m.encoder_q.backbone = _tiny_backbone(m.encoder_q.feature_dim)
        m.encoder_k = copy.deepcopy(m.encoder_q).requires_grad_(False)
        methods.append(m)
    eager, compiled = methods
    compiled.compile_networks()
    g = torch.Generator().manual_seed(2)
    batch = {
        "view1": torch.randn(4, 3, 8, 8, generator=g),
        "view2": torch.randn(4, 3, 8, 8, generator=g),
        "index": torch.arange(4),
        "label": torch.zeros(4, dtype=torch.long),
    }
    losses = []
    for m in (eager, compiled):
        m.train()
        loss, _ = m.training_step(batch, 0, 0)
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    ge = eager.encoder_q.backbone[0].weight.grad
    gc = dict(compiled.named_parameters())["encoder_q.backbone.0.weight"].grad
    assert gc is not None
    # the compiled kernels sum BatchNorm's statistics in another order: float32 rounding apart
    assert (ge - gc).abs().max() <= 2e-3 * ge.abs().max()
