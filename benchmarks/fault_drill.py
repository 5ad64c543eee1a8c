"""The fault drill: kill a pretraining run again and again, resume it, and check nothing was lost.

1. Data: real CIFAR images from the built-in set plus eight awkward files: a corrupt PNG (broken
   data stream), a truncated JPEG, a zero-byte file, a text file named .jpg, a CMYK JPEG, a
   16-bit greyscale PNG, a decompression bomb (a tiny PNG that decodes to 15,000 x 15,000
   pixels) and a JPEG whose EXIF says "rotate 90 degrees". The first five must be skipped (each
   named in a warning), the last three decoded.
2. An uninterrupted reference run of InterCLR (the ``r18-cifar`` preset at toy size: ResNet-18
   at 16 px, a checkpoint every few steps).
3. The same run started with ``INTERCLR_TEST_SLOW_WRITE`` (every checkpoint waits in its
   temporary file before the rename) and killed with SIGKILL ``--kills`` times: the 1st, 3rd, ...
   kill at a random moment up to ``--max-delay`` seconds after a new checkpoint has landed
   (mid-step, mid-write or between), the others as soon as the process starts writing its next
   checkpoint (killed while a checkpoint is being written). After each kill ``pretrain
   --resume`` continues the run from its latest checkpoint.
4. The final checkpoint's tensors (model, optimizer, method state, RNG) against the reference's,
   bit for bit; no temporary file may be left behind.
5. Pickle payloads (a raw pickle and a ``torch.save`` archive whose unpickling would run code
   that writes a marker file) offered as checkpoints to every command that reads one, and a
   checkpoint with a flipped byte, a truncated one and an empty one: each must be refused with
   exit code 2, and no payload may run.

Prints one JSON object (kills, resumes, tensors compared and differing, images skipped, payloads
executed, ...) with ``ok``; exits 0 when every check held, 1 otherwise. With the defaults it used
165-235 s of CPU time on 2 cores (measured on a shared, overloaded machine: 6-10 min of wall time
there; benchmarks/README.md), i.e. a few minutes on 2 idle cores.

    python benchmarks/fault_drill.py                       # 6 kills, 3 epochs
    python benchmarks/fault_drill.py --kills 12 --epochs 6 --seed 1 --keep /tmp/drill
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ROOT / "interclr_cli" / "builtin" / "cifar10-mini" / "train"
SLOW_WRITE_ENV = "INTERCLR_TEST_SLOW_WRITE"  # interclr_cli.runtime.safefile.SLOW_WRITE_ENV

#: InterCLR at toy size: every part of the method runs (bank, k-means, online labels, semi-hard
#: negatives), in a few seconds per epoch on 2 CPU cores.
TOY = [
    "model.arch=resnet18",
    "model.small_stem=false",
    "model.head_hidden=64",
    "model.embed_dim=32",
    "data.image_size=16",
    "data.eval_resize=16",
    "data.num_workers=0",
    "train.batch_size=8",
    "train.log_every=2",
    "train.keep_last=3",
    "device=cpu",
    "monitor.every=0",
    "method.queue_size=16",
    "method.inter.num_clusters=4",
    "method.inter.min_cluster_size=2",
    "method.inter.num_negatives=6",
    "method.inter.pool_fraction=0.5",
    "method.inter.centroid_update_every=2",
    "method.inter.kmeans_iters=5",
    "method.inter.kmeans_gpu=false",
]
UNREADABLE = ("corrupt.png", "truncated.jpg", "empty.jpg", "not-an-image.jpg", "bomb.png")
DECODABLE = ("cmyk.jpg", "sixteen-bit.png", "exif-rotated.jpg")


# --- data ---------------------------------------------------------------------------------------


def _bomb_png(path: Path, side: int = 15000) -> None:
    """A 1-bit PNG of side x side white pixels: ~30 KB on disk, 225 M pixels decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = b"\x00" + b"\xff" * ((side + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # bit depth 1, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def make_data(dest: Path, per_class: int, classes: int = 4) -> dict:
    """An ImageFolder tree of real images plus the awkward files (in its first class folder)."""
    from PIL import Image

    names = sorted(os.listdir(BUILTIN))[:classes]
    for c in names:
        (dest / c).mkdir(parents=True, exist_ok=True)
        for f in sorted(os.listdir(BUILTIN / c))[:per_class]:
            shutil.copy(BUILTIN / c / f, dest / c / f)
    bad = dest / names[0]
    sample = BUILTIN / names[0] / sorted(os.listdir(BUILTIN / names[0]))[0]
    img = Image.open(sample).convert("RGB")
    png = io.BytesIO()
    img.save(png, "PNG")
    broken = bytearray(png.getvalue())
    broken[broken.find(b"IDAT") + 10] ^= 0xFF
    (bad / "corrupt.png").write_bytes(bytes(broken))
    raw = sample.read_bytes()
    (bad / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "not-an-image.jpg").write_text("this is a text file, not a JPEG\n")
    img.convert("CMYK").save(bad / "cmyk.jpg")
    grey = Image.open(sample).convert("L")
    grey.point(lambda v: v * 256, mode="I").convert("I;16").save(bad / "sixteen-bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(bad / "exif-rotated.jpg", exif=exif)
    _bomb_png(bad / "bomb.png")
    return {"images": sum(len(os.listdir(dest / c)) for c in names), "unreadable": len(UNREADABLE)}


# --- runs ---------------------------------------------------------------------------------------


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "interclr_cli", *args]


def _env(slow: float | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "INTERCLR_DEBUG"}
    env.pop(SLOW_WRITE_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH")) if x)
    if slow:
        env[SLOW_WRITE_ENV] = str(slow)
    return env


def reference_run(out: Path, overrides: list[str]) -> dict:
    res = subprocess.run(
        _cmd("pretrain", "--preset", "r18-cifar", "--out", str(out), "--json", "--quiet", *overrides),
        capture_output=True,
        text=True,
        env=_env(None),
    )
    if res.returncode != 0:
        raise SystemExit(f"the reference run failed:\n{res.stderr[-2000:]}")
    summary = json.loads(res.stdout)
    log = re.sub(r"\s+", "", res.stderr)  # the console may wrap long lines
    summary["warned"] = [n for n in UNREADABLE + DECODABLE if f"{n}(" in log]
    return summary


def _latest_step(ckpt_dir: Path) -> int:
    from interclr_cli.training.checkpoint import list_checkpoints

    ckpts = list_checkpoints(ckpt_dir)
    return int(ckpts[-1].name.split("-s")[1].split(".")[0]) if ckpts else -1


def _temp_files(ckpt_dir: Path) -> list[Path]:
    return [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")] if ckpt_dir.is_dir() else []


def _wait(proc: subprocess.Popen, cond, timeout: float = 600) -> bool:
    """Poll ``cond()`` every 10 ms until it holds (True) or the process ends (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def kill_once(proc: subprocess.Popen, ckpt_dir: Path, during_write: bool, delay: float, rng: random.Random) -> str:
    """SIGKILL ``proc`` as soon as its next checkpoint's temporary file appears (``during_write``),
    or a random time (up to ``delay`` s) after its next checkpoint has landed. Returns what happened."""
    if during_write:
        pid = str(proc.pid)
        if not _wait(proc, lambda: any(f".{pid}.tmp" in p.name for p in _temp_files(ckpt_dir))):
            return "finished"
    else:
        start = _latest_step(ckpt_dir)
        if not _wait(proc, lambda: _latest_step(ckpt_dir) > start):
            return "finished"
        deadline = time.time() + rng.uniform(0.0, delay)
        _wait(proc, lambda: time.time() >= deadline)
        if proc.poll() is not None:
            return "finished"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "killed while writing" if during_write else "killed"


def killed_runs(out: Path, overrides: list[str], kills: int, slow: float, delay: float, rng: random.Random) -> dict:
    """Start the run, kill it ``kills`` times (resuming after each), then let it finish."""
    ckpt_dir = out / "checkpoints"
    first = _cmd("pretrain", "--preset", "r18-cifar", "--out", str(out), "--quiet", *overrides)
    resume = _cmd("pretrain", "--out", str(out), "--resume", "--quiet")
    stats = {"kills": 0, "kills_while_writing": 0, "resumes": 0, "finished_early": 0}
    for i in range(kills):
        proc = subprocess.Popen(
            first if i == 0 else resume, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(slow)
        )
        what = kill_once(proc, ckpt_dir, during_write=i % 2 == 1, delay=delay, rng=rng)
        if what == "finished":
            err = proc.stderr.read().decode(errors="replace")
            if proc.returncode != 0:
                raise SystemExit(f"a killed run's resume failed (exit {proc.returncode}):\n{err[-2000:]}")
            stats["finished_early"] += 1
            break
        stats["kills"] += 1
        stats["kills_while_writing"] += what == "killed while writing"
        stats["resumes"] += 1
    res = subprocess.run(resume + ["--json"], capture_output=True, text=True, env=_env(None))
    if res.returncode != 0:
        raise SystemExit(f"the final resume failed:\n{res.stderr[-2000:]}")
    stats["checkpoint"] = json.loads(res.stdout)["checkpoint"]
    stats["stale_temp_files"] = len(_temp_files(ckpt_dir))
    return stats


def compare(a: str, b: str) -> dict:
    """Every tensor of two checkpoints, bit for bit (both read with their digests checked)."""
    import torch

    from interclr_cli.runtime.safefile import read_tensors

    ta, tb = read_tensors(Path(a))[0], read_tensors(Path(b))[0]
    names = sorted(set(ta) | set(tb))
    differ = [k for k in names if k not in ta or k not in tb or not torch.equal(ta[k], tb[k])]
    return {"tensors_compared": len(names), "tensors_differing": len(differ), "differing": differ[:10]}


# --- hostile files ------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``exec`` on code that creates the marker file."""

    def __init__(self, marker: Path):
        self.code = f"open({str(marker)!r}, 'w').write('payload executed')"

    def __reduce__(self):
        return (exec, (self.code,))


def _in_process(args: list[str]) -> tuple[int, str]:
    """Run ``interclr ARGS`` in this process: (exit code, stderr)."""
    from interclr_cli.cli.app import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(args)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, err.getvalue()


def hostile_files(work: Path, data: Path, checkpoint: str) -> dict:
    """Offer pickle payloads and damaged checkpoints to the commands; count refusals and runs."""
    import torch

    marker = work / "PAYLOAD_EXECUTED"
    run = work / "hostile-run"  # a copy of the run folder, so that --resume FILE finds a run
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(checkpoint).parent.parent / "config.yaml", run / "config.yaml")
    payloads = []
    for name in ("payload.pth", "payload.pth.tar", "payload.safetensors"):
        p = run / "checkpoints" / name
        p.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
        payloads.append(p)
    zipped = run / "checkpoints" / "payload-zip.pth"
    torch.save({"state_dict": _Payload(marker)}, zipped)
    payloads.append(zipped)
    damaged = _damaged_copies(run / "checkpoints", Path(checkpoint))
    offered, refused, wrong = 0, 0, []
    out = work / "hostile-out"
    for p in payloads + list(damaged.values()):
        # the refusal must be for the file's own fault, not the data or the output
        why = ("damaged",) if p == damaged["flipped"] else ("pickle", "safetensors", "safe loading")
        for args in _consumers(p, data, out):
            code, err = _in_process(args)
            offered += 1
            ok = code == 2 and "Traceback" not in err and any(w in err for w in why)
            refused += ok
            if not ok:
                wrong.append(f"{' '.join(args[:2])} {p.name}: exit {code}, {err.strip()[-160:]}")
    return {
        "hostile_files_offered": offered,
        "hostile_files_refused": refused,
        "hostile_files_accepted": wrong[:5],
        "payloads_executed": int(marker.exists()),
    }


def _consumers(p: Path, data: Path, out: Path) -> list[list[str]]:
    """Every way a command takes a checkpoint file."""
    ov = [f"data.train={data}", f"data.val={data}", "device=cpu", "--quiet", "--force"]
    return [
        ["knn", str(p), *ov, "--k", "5", "--out", str(out / "knn")],
        ["export", str(p), "-o", str(out / "e.safetensors"), "--force"],
        ["export", "--from-moco", str(p), "-o", str(out / "m.safetensors"), "--force"],
        ["export", "--from-torchvision", str(p), "-o", str(out / "t.safetensors"), "--force"],
        ["pretrain", "--resume", str(p), "--quiet"],  # the run folder: p's parent's parent
    ]


def _damaged_copies(work: Path, ckpt: Path) -> dict[str, Path]:
    data = ckpt.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    flipped = bytearray(data)
    flipped[(start + len(data)) // 2] ^= 0x01  # one bit in the middle of the tensor data
    out = {"flipped": work / "flipped.safetensors", "truncated": work / "truncated.safetensors"}
    out["flipped"].write_bytes(bytes(flipped))
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["empty"] = work / "empty.safetensors"
    out["empty"].write_bytes(b"")
    return out


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=6, help="SIGKILLs (every other one while a checkpoint is written)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--per-class", type=int, default=16, help="real images in each of 4 classes")
    ap.add_argument("--ckpt-every", type=int, default=3, help="a checkpoint every N steps")
    ap.add_argument("--slow-write", type=float, default=0.3, help="seconds each checkpoint waits before its rename")
    ap.add_argument("--max-delay", type=float, default=1.5, help="random kills: up to this long after a checkpoint")
    ap.add_argument("--seed", type=int, default=0, help="the kill moments' random seed")
    ap.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary folder)")
    return ap.parse_args(argv)


def main() -> None:
    a = parse_args()
    t0 = time.time()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="interclr-drill-"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    try:
        summary = drill(work, a)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(summary))
    sys.exit(0 if summary["ok"] else 1)


def drill(work: Path, a) -> dict:
    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)
    counts = make_data(data, a.per_class)
    overrides = [f"data.root={data}", f"train.epochs={a.epochs}", f"train.ckpt_every_steps={a.ckpt_every}", *TOY]
    for d in ("ref", "run"):
        shutil.rmtree(work / d, ignore_errors=True)
    clock = [time.time()]

    def lap() -> float:
        clock.append(time.time())
        return round(clock[-1] - clock[-2], 1)

    ref = reference_run(work / "ref", overrides)
    seconds = {"reference": lap()}
    stats = killed_runs(work / "run", overrides, a.kills, a.slow_write, a.max_delay, random.Random(a.seed))
    seconds["killed_and_resumed"] = lap()
    same = compare(ref["checkpoint"], stats["checkpoint"])
    hostile = hostile_files(work, data, stats["checkpoint"])
    seconds["hostile_files"] = lap()
    summary = {
        "kills": stats["kills"],
        "kills_while_writing": stats["kills_while_writing"],
        "resumes": stats["resumes"],
        "finished_before_kill": stats["finished_early"],
        **same,
        "stale_temp_files": stats["stale_temp_files"],
        "images": counts["images"],
        "unreadable_images": counts["unreadable"],
        "images_skipped": ref["skipped"],
        "unreadable_images_named": sorted(n for n in ref["warned"] if n in UNREADABLE),
        "decodable_images_named": sorted(n for n in ref["warned"] if n in DECODABLE),
        **hostile,
        "phase_seconds": seconds,
    }
    summary["ok"] = (
        summary["kills"] == a.kills
        and summary["tensors_differing"] == 0
        and summary["tensors_compared"] > 0
        and summary["stale_temp_files"] == 0
        and summary["images_skipped"] > 0
        and summary["unreadable_images_named"] == sorted(UNREADABLE)
        and not summary["decodable_images_named"]
        and summary["hostile_files_refused"] == summary["hostile_files_offered"]
        and summary["payloads_executed"] == 0
    )
    return summary


if __name__ == "__main__":
    main()
