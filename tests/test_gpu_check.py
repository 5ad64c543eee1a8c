"""benchmarks/gpu_check.py in its CPU mode, and the synchronisation counter it shares (benchmarks/_sync_count.py).

The script is run as the GPU machine would run it: from the source tree (``PYTHONPATH=<repo>``),
with the packages that machine lacks (scikit-learn, faiss, onnx, onnxruntime, tensorboard,
matplotlib) made unimportable by a ``sitecustomize``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
ABSENT = ("sklearn", "faiss", "onnx", "onnxruntime", "tensorboard", "matplotlib")
BLOCKER = f"""
import sys
for name in {ABSENT!r}:
    sys.modules[name] = None  # `import name` raises ImportError, as on a machine without it
"""


def _load_counter():
    spec = importlib.util.spec_from_file_location("_sync_count", BENCH / "_sync_count.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _errors(obj, path="") -> list[str]:
    """Every ``error`` / ``*_error`` entry of a nested JSON object, with where it is."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "error" or k.endswith("_error"):
                out.append(f"{path}.{k}: {v}")
            else:
                out += _errors(v, f"{path}.{k}")
    return out


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    site = tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}")
    out = tmp / "report.json"
    cmd = [sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu", "--tiny", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # stdout is the one JSON object, nothing else
    assert json.loads(out.read_text()) == report
    return report, proc.stderr


@pytest.mark.slow
def test_tiny_run_reports_every_section_without_errors(tiny_report):
    report, stderr = tiny_report
    assert _errors(report) == []
    assert "section steps" in stderr and "section data_path" in stderr  # progress on stderr
    env = report["environment"]
    assert env["mode"] == "tiny" and env["device"] == "cpu" and env["faiss"] is False
    for name in ("steps", "inter_branch", "syncs", "jpegs", "device_augment", "data_path"):
        assert report["section_seconds"][name] >= 0
    assert report["total_seconds"] < 120


@pytest.mark.slow
def test_tiny_run_step_figures_are_consistent(tiny_report):
    report, _ = tiny_report
    steps, summary = report["steps"], report["summary"]
    assert set(steps) == {"fp32", "bf16_channels_last"}
    for precision, by_batch in steps.items():
        assert set(by_batch) == {"b4", "b8"}
        for key, row in by_batch.items():
            batch = int(key[1:])
            for method in ("mocov2", "interclr"):
                r = row[method]
                assert _positive(r["step_ms"]) and r["rounds"] >= 1
                assert r["img_s"] == pytest.approx(batch * 1000 / r["step_ms"], rel=1e-2, abs=0.1)
                assert r["peak_mem_gb"] is None  # CUDA only
            ratio = row["ratio_interclr_mocov2"]
            assert _positive(ratio)
            assert ratio == pytest.approx(row["interclr"]["step_ms"] / row["mocov2"]["step_ms"], rel=1e-3)
            assert summary["ratio_interclr_mocov2"][f"{precision}_{key}"] == ratio
            on = precision == "bf16_channels_last"
            assert row["settings"]["precision"] == ("bf16" if on else "none")
            assert row["settings"]["views_channels_last"] is on and row["settings"]["weights_channels_last"] is on


@pytest.mark.slow
def test_tiny_run_breakdown_syncs_and_data_path(tiny_report):
    report, _ = tiny_report
    stages = ("similarity", "pool", "sampling", "loss", "bank_update", "label_step", "centroid_recompute")
    for key, row in report["inter_branch"].items():
        if not key.startswith("b"):
            continue
        assert all(_positive(row[f"{s}_ms"]) for s in stages)
        per_step = sum(row[f"{s}_ms"] for s in stages if s not in ("pool", "centroid_recompute"))
        assert row["total_ms"] == pytest.approx(per_step, abs=1e-2)
        assert row["amortised_total_ms"] > row["total_ms"]
        assert set(row["syncs_per_call"]) == set(stages)
    for method in ("interclr", "mocov2", "npid"):
        s = report["syncs"][method]
        assert isinstance(s["direct_per_step"], (int, float)) and s["direct_per_step"] >= 0
        assert sum(s["sites"].values()) == pytest.approx(s["direct_per_step"] * s["steps"])
        assert report["summary"]["syncs_per_step"][method] == s["direct_per_step"]
        assert s["sync_debug_error_mode"] == {"skipped": "needs CUDA"}
    aug = report["device_augment"]
    assert aug["device_decoder"]["ok"] is True and aug["device_decoder"]["shape"][0] == 3
    assert all(_positive(aug[k]) for k in ("decode_ms_per_batch", "from_images_ms_per_view", "colour_ms_per_view"))
    for w in (0, 2):
        row = report["data_path"][f"workers_{w}"]
        for path in ("pil_workers", "pil_crop_device_colour", "device_decode"):
            assert _positive(row[f"{path}_img_s"])
            assert row[f"{path}_detail"]["images"] >= 8
    targets = report["summary"]["targets"]  # GPU targets: not judged from a tiny CPU run
    assert report["summary"]["targets_apply"] is False
    assert targets == {
        "ratio_bf16_max_batch_le_1.05": None,
        "device_decode_ge_2000_img_s": None,
        "zero_syncs_per_step": None,
    }


def test_sync_counter_counts_each_kind_from_its_roots_only(tmp_path):
    sc = _load_counter()
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    (outside / "lib_helper.py").write_text("def read(t):\n    return t.item()\n")
    (inside / "probe_code.py").write_text(
        "import torch\n"
        "import lib_helper\n"
        "def run(t):\n"
        "    m = t > 0\n"
        "    t.sum().item(); t.tolist(); bool(t.sum()); int(t.sum()); float(t.sum())\n"  # 5 syncs
        "    t[m]; t[m] = 0.0; t.nonzero(); torch.nonzero(t); t.cpu(); t.numpy()\n"  # 6 syncs
        "    t[0]; t[torch.tensor([0, 1])]; t + 1; t.sum()\n"  # none: no mask, no host value
        "    lib_helper.read(t.sum())\n"  # 1 indirect
        "    return f'{t.sum():.3f}'\n"  # torch's __format__ calls .item(): 1 indirect
    )
    sys.path[:0] = [str(inside), str(outside)]
    try:
        probe = importlib.import_module("probe_code")
        before = {n: torch.Tensor.__dict__.get(n) for n in sc.TENSOR_METHODS + sc.MASK_METHODS}
        nonzero = torch.nonzero
        counter = sc.SyncCounter(roots=[inside])
        with counter:
            probe.run(torch.tensor([1.0, -2.0, 3.0]))
            torch.tensor([1.0]).item()  # from this test file: outside the roots
    finally:
        del sys.path[:2]
        sys.modules.pop("probe_code", None)
        sys.modules.pop("lib_helper", None)
    kinds = sorted(site.split(" ")[1] for site in counter.sites.elements())
    assert kinds == sorted(
        ["item", "tolist", "bool", "int", "float", "getitem[bool]", "setitem[bool]", "nonzero", "torch.nonzero"]
        + ["cpu", "numpy"]
    )
    assert all(site.startswith("probe_code.py:") for site in counter.sites)
    assert counter.direct == 11 and counter.indirect == 2
    assert sorted(counter.indirect_sites.values()) == [1, 1]
    assert counter.summary(steps=2)["direct_per_step"] == 5.5
    # every patched attribute is back as it was
    assert {n: torch.Tensor.__dict__.get(n) for n in before} == before
    assert torch.nonzero is nonzero


def test_sync_debug_error_restores_the_mode_and_names_the_frame(tmp_path, monkeypatch):
    """The CUDA debug-mode wrapper's control flow, with torch.cuda's mode switch recorded (no GPU here)."""
    sc = _load_counter()
    calls: list = []
    mode = {"now": 0}

    def set_mode(m):
        mode["now"] = {"default": 0, "warn": 1, "error": 2}.get(m, m)
        calls.append(("set", mode["now"]))

    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode["now"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_mode)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(("sync", mode["now"])))
    (tmp_path / "syncing_code.py").write_text(
        "def step(fail):\n    if fail:\n        raise RuntimeError('called a synchronizing CUDA operation\\nmore')\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        step = importlib.import_module("syncing_code").step
        bad = sc.sync_debug_error(lambda: step(True), roots=[tmp_path])
        good = sc.sync_debug_error(lambda: step(False), roots=[tmp_path])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("syncing_code", None)
    assert bad == {"raised": True, "message": "called a synchronizing CUDA operation", "where": "syncing_code.py:3"}
    assert good == {"raised": False, "message": None, "where": None}
    # each run: error mode on, back to the previous mode, then a synchronize outside error mode
    assert calls == [("set", 2), ("set", 0), ("sync", 0)] * 2
    assert mode["now"] == 0
