"""Checkpoint I/O: atomic writes, full round trip, and one-line errors for bad files."""

import json
import random

import numpy as np
import pytest
import torch

from interclr_cli.config import load_config, to_mapping
from interclr_cli.errors import UserError
from interclr_cli.methods import build_method
from interclr_cli.training.checkpoint import (
    TrainingCheckpoint,
    atomic_save,
    check_compatible,
    checkpoint_name,
    list_checkpoints,
    load_optimizer,
    prune_checkpoints,
    read_safetensors,
    restore_rng,
    save_training_checkpoint,
)


def _tiny_cfg(**over):
    ov = [
        "model.arch=resnet18",
        "model.small_stem=true",
        "method.queue_size=64",
        "model.embed_dim=16",
        "model.head_hidden=32",
    ]
    return load_config("mocov2-r18-cifar", ov + [f"{k}={v}" for k, v in over.items()])


def _train_a_step(method, opt):
    x = torch.randn(4, 3, 16, 16)
    batch = {"view1": x, "view2": x.flip(3), "index": torch.arange(4), "label": torch.zeros(4, dtype=torch.long)}
    loss, _ = method.training_step(batch, 0, 0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    method.after_optimizer_step(0)


def test_round_trip_restores_every_tensor_and_rng(tmp_path):
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    method = build_method(cfg, 100)
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    _train_a_step(method, opt)
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    path = tmp_path / "c.safetensors"
    save_training_checkpoint(
        path,
        model_state=method.state_dict(),
        extra_state={"gen": torch.arange(3)},
        optimizer=opt,
        config=to_mapping(cfg),
        epoch=3,
        step=42,
        step_in_epoch=2,
    )
    expect_next = (random.random(), np.random.rand(), torch.rand(1))

    ck = TrainingCheckpoint(path)
    assert (ck.epoch, ck.step, ck.step_in_epoch) == (3, 42, 2)
    assert ck.config == json.loads(json.dumps(to_mapping(cfg)))
    # every tensor of the model state, including both encoders, the queue and BN buffers
    sd = method.state_dict()
    model = ck.section("model")
    assert set(model) == set(sd)
    assert any(k.startswith("encoder_k.") for k in model) and "queue" in model and "queue_ptr" in model
    for k, v in sd.items():
        assert torch.equal(model[k], v), k
    assert torch.equal(ck.section("method")["gen"], torch.arange(3))

    method2 = build_method(cfg, 100)
    method2.load_state_dict(model)
    opt2 = torch.optim.SGD(method2.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    load_optimizer(opt2, ck.tensors, ck.optimizer_meta)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for pid in s1["state"]:
        assert torch.equal(s1["state"][pid]["momentum_buffer"], s2["state"][pid]["momentum_buffer"])
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    restore_rng(ck.tensors, ck.rng_meta)
    got = (random.random(), np.random.rand(), torch.rand(1))
    assert got[0] == expect_next[0] and got[1] == expect_next[1] and torch.equal(got[2], expect_next[2])


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    atomic_save({"a": torch.ones(2)}, path, {"format": "x"})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError):
        atomic_save({"a": torch.zeros(2)}, path, {"format": "x"})
    # the old file is intact and no temporary file is left behind
    t, _ = read_safetensors(path)
    assert torch.equal(t["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", None])
def test_bad_files_are_one_line_user_errors(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    if content is None:  # truncated real checkpoint
        atomic_save({"a": torch.randn(1000)}, path, {"format": "interclr-checkpoint"})
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as e:
        TrainingCheckpoint(path)
    assert "\n" not in str(e.value) and "safetensors" in str(e.value)


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        TrainingCheckpoint(tmp_path / "nope.safetensors")
    p = tmp_path / "other.safetensors"
    atomic_save({"w": torch.ones(1)}, p, {"format": "something-else"})
    with pytest.raises(UserError, match="not an interclr training checkpoint"):
        TrainingCheckpoint(p)


def test_incompatible_config_is_refused(tmp_path):
    a = to_mapping(_tiny_cfg())
    b = to_mapping(_tiny_cfg(**{"model.arch": "resnet34"}))
    with pytest.raises(UserError, match="model.arch='resnet18' but the config says model.arch='resnet34'"):
        check_compatible(a, b, tmp_path / "c.safetensors")
    # a schedule change is allowed (e.g. extending a run)
    check_compatible(a, to_mapping(_tiny_cfg(**{"train.epochs": 999})), tmp_path / "c.safetensors")


def test_keep_last_k(tmp_path):
    for e in range(1, 6):
        atomic_save({"a": torch.ones(1)}, tmp_path / checkpoint_name(e, e * 10), {})
    (tmp_path / "unrelated.txt").write_text("keep me")
    prune_checkpoints(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(4, 40), checkpoint_name(5, 50)]
    assert (tmp_path / "unrelated.txt").exists()
