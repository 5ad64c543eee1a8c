"""benchmarks/fault_drill.py at small size: 2 SIGKILLs (one while a checkpoint is being written),
resumed; the final tensors equal an uninterrupted run's; hostile files refused, no payload runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DRILL = Path(__file__).resolve().parent.parent / "benchmarks" / "fault_drill.py"


def _drill_module():
    spec = importlib.util.spec_from_file_location("fault_drill", DRILL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_two_kill_fault_drill(tmp_path):
    drill = _drill_module()
    args = drill.parse_args(["--kills", "2", "--epochs", "2", "--per-class", "8", "--ckpt-every", "2"])
    s = drill.drill(tmp_path, args)
    assert s["kills"] == 2 and s["kills_while_writing"] == 1 and s["resumes"] == 2, s
    assert s["finished_before_kill"] == 0, s
    # every tensor of the final checkpoint (model, optimizer, bank, labels, RNG) bit for bit
    assert s["tensors_compared"] > 300 and s["tensors_differing"] == 0, s["differing"]
    assert s["stale_temp_files"] == 0
    assert s["unreadable_images_named"] == sorted(drill.UNREADABLE) and s["decodable_images_named"] == []
    assert s["images_skipped"] > 0
    assert s["payloads_executed"] == 0 and not (tmp_path / "PAYLOAD_EXECUTED").exists()
    assert s["hostile_files_offered"] == 7 * 5 and s["hostile_files_refused"] == s["hostile_files_offered"]
    assert s["ok"]
