"""End-to-end pretraining on tiny real-image trees: run folders, JSON, determinism, resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_clean_error, run_cli
from safetensors.torch import load_file

from interclr_cli.commands.pretrain import run_pretrain
from interclr_cli.errors import WorkError
from interclr_cli.training.checkpoint import list_checkpoints


def _model_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(("model.", "optim.", "method."))}


def test_run_folder_layout_and_json(tiny_data, tmp_path):
    out = tmp_path / "run"
    res = run_cli(
        "pretrain",
        "--preset",
        "mocov2-r18-cifar",
        "--out",
        str(out),
        "--json",
        "--quiet",
        f"data.root={tiny_data / 'train'}",
        "train.epochs=2",
        *TINY,
        "monitor.every=1",
        "monitor.rankme_samples=40",
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)  # stdout is exactly one JSON object
    assert summary["run_dir"] == str(out) and summary["epochs"] == 2 and summary["steps"] == 12
    assert Path(summary["checkpoint"]).is_file()
    assert 1.0 <= summary["rankme"] <= 32.0 and 0.0 <= summary["knn_top1"] <= 100.0
    assert (out / "config.yaml").is_file() and (out / "train.log").is_file() and (out / "file_index.txt").is_file()
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["type"] for r in recs]
    assert kinds.count("epoch") == 2 and "step" in kinds and kinds[0] == "monitor"
    assert all("loss" in r and "lr" in r for r in recs if r["type"] == "step")
    assert "knn_top1" in recs[-1] and "rankme_backbone" in recs[-1]


def test_refuses_to_overwrite_a_run(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = [
        "pretrain",
        "--preset",
        "mocov2-r18-cifar",
        "--out",
        str(out),
        "--quiet",
        f"data.root={tiny_data / 'train'}",
        "train.epochs=1",
        "train.max_steps=1",
        *TINY,
    ]
    assert run_cli(*args).returncode == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    res = run_cli(*args)
    assert_clean_error(res, 2, "already exists")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    # --force is refused for a folder that is not an interclr run
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    res = run_cli(*args[:3], "--out", str(other), "--force", *args[5:])
    assert_clean_error(res, 2, "not an interclr run folder")
    assert (other / "notes.txt").read_text() == "precious"
    # --force on a run folder starts afresh
    assert run_cli(*args, "--force").returncode == 0


def test_same_seed_is_bit_identical(tiny_data, tmp_path):
    common = dict(preset="mocov2-r18-cifar", resume=None, force=False, show_progress=False)
    ov = [f"data.root={tiny_data / 'train'}", "train.epochs=1", "train.max_steps=4", *TINY]
    a = run_pretrain(overrides=ov, out=str(tmp_path / "a"), **common)
    b = run_pretrain(overrides=ov, out=str(tmp_path / "b"), **common)
    ta, tb = _model_tensors(Path(a["checkpoint"])), _model_tensors(Path(b["checkpoint"]))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    c = run_pretrain(overrides=ov + ["seed=1"], out=str(tmp_path / "c"), **common)
    tc = _model_tensors(Path(c["checkpoint"]))
    assert not torch.equal(ta["model.encoder_q.head.2.weight"], tc["model.encoder_q.head.2.weight"])


def test_sigkill_and_resume_equals_uninterrupted(tiny_data, tmp_path):
    ov = [f"data.root={tiny_data / 'train'}", "train.epochs=4", *TINY]
    ref = run_cli("pretrain", "--preset", "mocov2-r18-cifar", "--out", str(tmp_path / "ref"), "--json", "--quiet", *ov)
    assert ref.returncode == 0, ref.stderr
    ref_ckpt = Path(json.loads(ref.stdout)["checkpoint"])

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "interclr_cli",
            "pretrain",
            "--preset",
            "mocov2-r18-cifar",
            "--out",
            str(out),
            "--quiet",
            *ov,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list_checkpoints(out / "checkpoints"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = list_checkpoints(out / "checkpoints")
    assert ckpts and ckpts[-1].name != ref_ckpt.name, "the run was not interrupted"
    res = run_cli("pretrain", "--out", str(out), "--resume", "--json", "--quiet")
    assert res.returncode == 0, res.stderr
    got = Path(json.loads(res.stdout)["checkpoint"])
    assert got.name == ref_ckpt.name
    a, b = _model_tensors(ref_ckpt), _model_tensors(got)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]


@pytest.mark.parametrize(
    "augment",
    [["data.augment_on=workers"], ["data.augment_on=device"], ["data.augment_on=device", "data.in_memory=true"]],
    ids=["workers", "device", "in_memory"],
)
def test_mid_epoch_checkpoint_resume(tiny_data, tmp_path, augment):
    common = dict(preset="mocov2-r18-cifar", force=False, show_progress=False)
    ov = [f"data.root={tiny_data / 'train'}", "train.epochs=2", *augment, *TINY]
    ref = run_pretrain(overrides=ov, out=str(tmp_path / "ref"), resume=None, **common)
    part = run_pretrain(overrides=ov + ["train.max_steps=3"], out=str(tmp_path / "p"), resume=None, **common)
    assert part["steps"] == 3
    # continue the same run without the step limit: resumes at step 3, mid-epoch
    done = run_pretrain(
        preset=None,
        overrides=["train.max_steps=0"],
        out=str(tmp_path / "p"),
        resume="__latest__",
        force=False,
        show_progress=False,
    )
    assert done["steps"] == ref["steps"] == 12
    a, b = _model_tensors(Path(ref["checkpoint"])), _model_tensors(Path(done["checkpoint"]))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "cadence,names",
    [(["train.ckpt_every=0"], [(3, 18)]), (["train.ckpt_every=2"], [(2, 12), (3, 18)])],
    ids=["every0-last-only", "every2"],
)
def test_checkpoint_cadence_per_epoch(tiny_data, tmp_path, cadence, names):
    """``train.ckpt_every=0``: no per-epoch checkpoints, only the last (it divided by zero); N:
    every N epochs and the last. 3 epochs of 6 steps, nothing pruned (keep_last 5)."""
    from interclr_cli.training.checkpoint import checkpoint_name

    ov = [f"data.root={tiny_data / 'train'}", "train.epochs=3", "train.keep_last=5", *TINY, *cadence]
    res = run_pretrain("mocov2-r18-cifar", ov, out=str(tmp_path / "run"), resume=None, force=False, show_progress=False)
    assert res["steps"] == 18
    got = [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert got == [checkpoint_name(e, s) for e, s in names]
    res = run_cli("pretrain", "--preset", "mocov2-r18-cifar", "train.ckpt_every_steps=-1", *TINY)
    assert_clean_error(res, 2, "train.ckpt_every_steps must be >= 0")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    from interclr_cli.methods.mocov2 import MoCoV2

    orig = MoCoV2.training_step

    def poisoned(self, batch, step, epoch):
        loss, logs = orig(self, batch, step, epoch)
        return (loss * float("nan") if step >= 8 else loss), logs

    monkeypatch.setattr(MoCoV2, "training_step", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(WorkError, match="loss became nan") as e:
        run_pretrain(
            "mocov2-r18-cifar",
            [f"data.root={tiny_data / 'train'}", "train.epochs=3", *TINY],
            out=str(out),
            resume=None,
            force=False,
            show_progress=False,
        )
    assert "\n" not in str(e.value)
    names = [p.name for p in list_checkpoints(out / "checkpoints")]
    assert names == ["ckpt-e0001-s00000006.safetensors"]


def test_cli_error_paths_are_one_line(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run folder would be ./runs/...
    assert_clean_error(run_cli("pretrain", "--preset", "nope-preset"), 2, "unknown preset")
    assert_clean_error(run_cli("pretrain", "--preset", "quickstart", "optim.lrr=1"), 2, "did you mean 'optim.lr'")
    assert_clean_error(
        run_cli("pretrain", "--preset", "quickstart", "train.epochs=two"), 2, "train.epochs expects integer"
    )
    assert_clean_error(
        run_cli("pretrain", "--preset", "quickstart", f"data.root={tmp_path / 'missing'}", "device=cpu"),
        2,
        "does not exist",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(
        run_cli(
            "pretrain", "--preset", "quickstart", f"data.root={empty}", "device=cpu", "--out", str(tmp_path / "r1")
        ),
        2,
    )
    if torch.cuda.is_available():  # a GPU host: a GPU that is not there
        n = torch.cuda.device_count()
        assert_clean_error(run_cli("pretrain", "--preset", "quickstart", f"device=cuda:{n}"), 2, f"only {n} GPU(s)")
    else:
        assert_clean_error(run_cli("pretrain", "--preset", "quickstart", "device=cuda"), 2, "no CUDA GPU")
    assert_clean_error(run_cli("pretrain", "data.root=x"), 2, "--preset is required")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    assert_clean_error(run_cli("pretrain", "--resume", str(bad)), 2, "not a readable safetensors")
    assert_clean_error(run_cli("pretrain", "--resume", str(tmp_path / "nothing")), 2, "does not exist")
    res = run_cli("pretrain", "--no-such-flag")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    # bad input left nothing behind: no run folder was created
    assert not (tmp_path / "runs").exists() and not (tmp_path / "r1").exists()


def test_resume_refuses_incompatible_config(tiny_data, tmp_path):
    out = tmp_path / "r"
    ov = [f"data.root={tiny_data / 'train'}", "train.epochs=1", "train.max_steps=1", *TINY]
    assert run_cli("pretrain", "--preset", "mocov2-r18-cifar", "--out", str(out), "--quiet", *ov).returncode == 0
    res = run_cli("pretrain", "--out", str(out), "--resume", "model.arch=resnet34")
    assert_clean_error(res, 2, "model.arch='resnet18' but the config says model.arch='resnet34'")


def test_help_shows_examples():
    for args in (["--help"], ["pretrain", "--help"], ["presets", "--help"], ["presets", "show", "--help"]):
        res = run_cli(*args)
        assert res.returncode == 0 and "Examples" in res.stdout, (args, res.stdout)


def test_presets_list_and_show():
    res = run_cli("presets", "--json")
    assert res.returncode == 0
    names = json.loads(res.stdout)
    assert "quickstart" in names and "r50-imagenet" in names
    res = run_cli("presets", "show", "r18-cifar", "optim.lr=0.5")
    assert res.returncode == 0 and "lr: 0.5" in res.stdout and "name: interclr" in res.stdout


def test_module_entry_point_and_usage_errors_in_a_real_process():
    res = run_cli("--help", subprocess_=True)
    assert res.returncode == 0 and "pretrain" in res.stdout and "Examples" in res.stdout
    res = run_cli("pretrain", "--preset", "quickstart", "optim.lrr=1", subprocess_=True)
    assert_clean_error(res, 2, "did you mean 'optim.lr'")
