"""Cost of the checkpoint digest (interclr_cli/runtime/safefile.py), side by side.

A MoCo v2 ResNet-50 training checkpoint's tensors (query and key encoders with their projection
heads, the query's momentum buffers, the 65,536-key queue; ``--bank N`` adds InterCLR's memory
bank of N x 128 rows) are saved and loaded in interleaved repetitions:

- save: ``write_tensors`` with the digest, without it, and the previous writer (clone every
  tensor, ``safetensors.torch.save_file``, fsync, rename);
- load: ``read_tensors`` verifying the digest, not verifying, and the previous reader
  (``safe_open`` for the metadata, then ``load_file``); each followed by one copy of every tensor,
  as ``load_state_dict`` makes (safetensors maps the file, so a bare load reads nothing yet).

Every save ends with fsync; the loads read a file the page cache still holds (the worst case for
the check's relative cost: no disk time to hide it). Prints one JSON object with the medians
(seconds) and the ratios.

    python benchmarks/bench_checkpoint_io.py                      # MoCo v2 ResNet-50, 5 repetitions
    python benchmarks/bench_checkpoint_io.py --bank 1281167 --reps 3   # InterCLR at ImageNet size
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from interclr_cli.models import MoCoV2Head, build_backbone
from interclr_cli.runtime.safefile import read_tensors, tensor_digest, write_tensors


def checkpoint_tensors(bank: int) -> dict[str, torch.Tensor]:
    """The tensors of a MoCo v2 (or, with ``bank`` rows, InterCLR) ResNet-50 training checkpoint."""
    torch.manual_seed(0)
    out = {}
    for enc in ("encoder_q", "encoder_k"):
        backbone, dim = build_backbone("resnet50", False)
        head = MoCoV2Head(dim, 2048, 128)
        for part, mod in (("backbone", backbone), ("head", head)):
            for k, v in mod.state_dict().items():
                out[f"model.{enc}.{part}.{k}"] = v.detach().clone()
    params = [k for k in out if k.startswith("model.encoder_q.") and out[k].is_floating_point()]
    for i, k in enumerate(params):
        out[f"optim.state.{i}.momentum_buffer"] = torch.randn_like(out[k])
    out["model.queue"] = torch.nn.functional.normalize(torch.randn(128, 65536), dim=0)
    if bank:
        out["model.bank.features"] = torch.nn.functional.normalize(torch.randn(bank, 128), dim=1)
    return out


def old_save(tensors: dict, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.old.tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=meta)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def old_load(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


def materialise(tensors: dict) -> None:
    for t in tensors.values():
        t.clone()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", type=int, default=0, help="memory bank rows (InterCLR; ImageNet: 1281167)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--where", default=None, help="folder for the files (default: a temporary folder)")
    a = ap.parse_args()
    tensors = checkpoint_tensors(a.bank)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    meta = {"format": "interclr-checkpoint"}
    times: dict[str, list[float]] = {
        k: [] for k in ("save_digest", "save_plain", "save_old", "load_verify", "load_plain", "load_old", "digest_only")
    }
    with tempfile.TemporaryDirectory(dir=a.where) as d:
        paths = {k: Path(d, f"{k}.safetensors") for k in ("digest", "plain", "old")}
        save = {
            "save_digest": lambda: write_tensors(paths["digest"], tensors, meta),
            "save_plain": lambda: write_tensors(paths["plain"], tensors, meta, digest=False),
            "save_old": lambda: old_save(tensors, paths["old"], meta),
        }
        load = {  # each load also copies every tensor once, as load_state_dict does (the files are mmapped)
            "load_verify": lambda: materialise(read_tensors(paths["digest"], verify=True)[0]),
            "load_plain": lambda: materialise(read_tensors(paths["digest"], verify=False)[0]),
            "load_old": lambda: materialise(old_load(paths["digest"])[0]),
        }
        for rep in range(a.reps):  # interleaved, the order rotated every repetition
            for group in (save, load):
                names = list(group)
                for name in names[rep % 3 :] + names[: rep % 3]:
                    times[name].append(timed(group[name]))
            times["digest_only"].append(timed(lambda: tensor_digest(tensors)))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "tensors": len(tensors),
                "megabytes": round(nbytes / 2**20, 1),
                "reps": a.reps,
                "threads_for_digest": min(8, len(os.sched_getaffinity(0))),
                "median_s": {k: round(v, 4) for k, v in med.items()},
                "digest_MB_per_s": round(nbytes / 2**20 / med["digest_only"], 1),
                "ratio_save_digest_vs_plain": round(med["save_digest"] / med["save_plain"], 3),
                "ratio_save_digest_vs_old": round(med["save_digest"] / med["save_old"], 3),
                "ratio_load_verify_vs_plain": round(med["load_verify"] / med["load_plain"], 3),
                "ratio_load_verify_vs_old": round(med["load_verify"] / med["load_old"], 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
