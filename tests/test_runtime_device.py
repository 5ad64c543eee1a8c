"""Device selection on hosts with and without usable GPUs (the GPU cases faked on the CPU)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from interclr_cli.errors import UserError
from interclr_cli.runtime import device as device_mod


def _fake_nvidia_smi(tmp_path, monkeypatch, output: str, code: int = 0) -> None:
    exe = tmp_path / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\nexit {code}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_nvidia_smi_gpus_counts_the_listed_gpus(tmp_path, monkeypatch):
    _fake_nvidia_smi(
        tmp_path,
        monkeypatch,
        "GPU 0: NVIDIA H200 (UUID: GPU-1)\nGPU 1: NVIDIA H200 (UUID: GPU-2)\n  MIG 1g.18gb Device 0: (UUID: MIG-1)",
    )
    assert device_mod.nvidia_smi_gpus() == 2
    _fake_nvidia_smi(tmp_path, monkeypatch, "NVIDIA-SMI has failed because it couldn't communicate", code=9)
    assert device_mod.nvidia_smi_gpus() == 0
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert device_mod.nvidia_smi_gpus() == 0


def test_auto_refuses_a_gpu_that_torch_cannot_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "nvidia_smi_gpus", lambda: 8)
    with pytest.raises(UserError) as e:
        device_mod.select_device("auto")
    msg = str(e.value)
    assert "\n" not in msg and "nvidia-smi lists 8 GPU(s)" in msg and torch.__version__ in msg
    assert "device=cpu" in msg  # the way out
    assert device_mod.select_device("cpu") == torch.device("cpu")  # an explicit CPU still runs


def test_auto_without_any_gpu_runs_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "nvidia_smi_gpus", lambda: 0)
    assert device_mod.select_device("auto") == torch.device("cpu")
