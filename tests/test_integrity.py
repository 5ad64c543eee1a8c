"""Files that prove their integrity (digest written with the data, checked on every load) and
storage errors as one-line messages (interclr_cli/runtime/safefile.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_clean_error, run_cli
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from interclr_cli.errors import UserError
from interclr_cli.runtime import safefile
from interclr_cli.runtime.safefile import (
    DIGEST_KEY,
    StorageError,
    read_tensors,
    temp_name,
    verification,
    write_tensors,
)
from interclr_cli.training.checkpoint import (
    TrainingCheckpoint,
    checkpoint_name,
    list_checkpoints,
    prune_checkpoints,
    read_safetensors,
)


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return {
        "w": torch.randn(3, 4, generator=g),
        "half": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "idx": torch.arange(10, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "view": base[2:4],  # a view into a larger storage
        "alias_a": base,  # two names on one storage: safetensors needs a copy of one
        "alias_b": base,
    }


def _expected_digest(tensors: dict[str, torch.Tensor], chunk: int) -> str:
    """The documented construction, written out plainly (numpy bytes, one chunk after another)."""
    lines = []
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        chunks = [raw[i : i + chunk] for i in range(0, len(raw), chunk)] or [b""]
        hexes = ",".join(hashlib.sha256(c).hexdigest() for c in chunks)
        lines.append(f"{name}\t{str(t.dtype).replace('torch.', '')}\t{list(t.shape)}\t{hexes}\n")
    return "sha256:" + hashlib.sha256(b"interclr-digest-1\n" + "".join(lines).encode()).hexdigest()


def _data_start(path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _flip(path, pos: int, n: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for i in range(pos, pos + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# --- the digest ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [safefile.CHUNK_BYTES, 16])
def test_digest_matches_the_documented_construction(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(safefile, "CHUNK_BYTES", chunk)  # 16: every tensor spans several pieces
    tensors = _mixed()
    path = tmp_path / "m.safetensors"
    write_tensors(path, tensors, {"format": "x"})
    meta = read_tensors(path, verify=False)[1]
    assert meta[DIGEST_KEY] == _expected_digest(tensors, chunk)
    assert meta["format"] == "x"


def test_round_trip_every_dtype_and_plain_safetensors_reads_it(tmp_path):
    tensors = _mixed()
    path = tmp_path / "m.safetensors"
    size = write_tensors(path, tensors, {"format": "x"})
    assert size == path.stat().st_size
    got, meta = read_tensors(path)
    plain = load_file(str(path))  # any other tool still reads the file
    assert set(got) == set(plain) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v) and torch.equal(plain[k], v), k
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_digest_depends_on_names_dtypes_and_shapes():
    t = torch.arange(6, dtype=torch.float32)
    d = safefile.tensor_digest
    assert d({"a": t}) != d({"b": t})
    assert d({"a": t}) != d({"a": t.view(torch.int32)})  # same bytes, another dtype
    assert d({"a": t}) != d({"a": t.view(2, 3)})  # same bytes, another shape
    assert d({"a": t}) == d({"a": t.clone()})


@pytest.mark.parametrize("where", ["first", "middle", "last", "header_dtype"])
def test_a_damaged_file_is_refused_with_one_line(tmp_path, where):
    path = tmp_path / "ckpt.safetensors"
    write_tensors(path, {"a": torch.randn(300), "b": torch.randn(40, 7)}, {"format": "interclr-checkpoint"})
    start, end = _data_start(path), path.stat().st_size
    if where == "header_dtype":  # F32 -> I32 in the header: same size, other meaning
        data = path.read_bytes()
        path.write_bytes(data.replace(b'"F32"', b'"I32"', 1))
    else:
        pos = {"first": start, "middle": (start + end) // 2 - 32, "last": end - 1}[where]
        _flip(path, pos, 64 if where == "middle" else 1)
    with pytest.raises(UserError) as e:
        read_tensors(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "damaged" in msg and "earlier checkpoint" in msg
    # the checkpoint readers of every command refuse it the same way
    with pytest.raises(UserError, match="damaged"):
        read_safetensors(path)
    # --no-verify loads it anyway, and the damage is really there
    with verification(False):
        got, _ = read_safetensors(path)
    assert set(got) == {"a", "b"}


def test_files_without_a_digest_load_as_before(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(3)}, str(path), metadata={"format": "something"})
    got, meta = read_tensors(path)
    assert DIGEST_KEY not in meta and torch.equal(got["w"], torch.ones(3))
    path2 = tmp_path / "foreign2.safetensors"
    save_file({"w": torch.ones(3)}, str(path2))  # no metadata at all
    assert torch.equal(read_tensors(path2)[0]["w"], torch.ones(3))


def test_unknown_digest_kind_names_the_fix(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.ones(3)}, str(path), metadata={DIGEST_KEY: "blake9:00"})
    with pytest.raises(UserError, match="unknown kind.*--no-verify"):
        read_tensors(path)


def test_verification_is_restored_after_the_block():
    assert safefile.verify_enabled()
    with pytest.raises(RuntimeError):
        with verification(False):
            assert not safefile.verify_enabled()
            raise RuntimeError
    assert safefile.verify_enabled()


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_refuses_a_damaged_export_and_no_verify_loads_it(tmp_path):
    good = tmp_path / "r18.safetensors"
    res = run_cli("export", "random:resnet18-small", "-o", str(good), "--json")
    assert res.returncode == 0, res.stderr
    assert DIGEST_KEY in read_tensors(good)[1]
    start, end = _data_start(good), good.stat().st_size
    _flip(good, (start + end) // 2, 64)  # 64 bytes overwritten in the middle, as in the report
    res = run_cli("export", str(good), "-o", str(tmp_path / "again.safetensors"))
    assert_clean_error(res, 2, "damaged")
    assert "earlier checkpoint" in res.stderr and str(good) in res.stderr
    assert not (tmp_path / "again.safetensors").exists()
    res = run_cli("export", str(good), "-o", str(tmp_path / "again.safetensors"), "--no-verify", "--json")
    assert res.returncode == 0, res.stderr
    assert safefile.verify_enabled()  # the flag did not leak out of the command


def test_knn_on_a_damaged_checkpoint_exits_2(tiny_data, tmp_path):
    out = tmp_path / "run"
    ov = [f"data.root={tiny_data / 'train'}", "train.epochs=1", "train.max_steps=2", *TINY]
    res = run_cli("pretrain", "--preset", "mocov2-r18-cifar", "--out", str(out), "--json", "--quiet", *ov)
    assert res.returncode == 0, res.stderr
    ckpt = json.loads(res.stdout)["checkpoint"]
    ck = TrainingCheckpoint(ckpt)
    assert ck.meta[DIGEST_KEY].startswith("sha256:")
    start, end = _data_start(ckpt), os.path.getsize(ckpt)
    _flip(Path(ckpt), (start + end) // 2, 64)
    res = run_cli("knn", ckpt, f"data.root={tiny_data}", "--quiet", "--out", str(tmp_path / "knn"), "device=cpu")
    assert_clean_error(res, 2, "damaged")
    res = run_cli("pretrain", "--out", str(out), "--resume", "--quiet")
    assert_clean_error(res, 2, "damaged")


# --- storage errors -----------------------------------------------------------------------------

STORAGE = [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO]


def _inject(monkeypatch, code: int, stage: str, after: int = 0) -> None:
    """Make the ``after``+1-th checkpoint write fail with ``code`` at ``stage``."""
    calls = {"n": 0}
    real_save, real_fsync, real_replace = safefile_save(), os.fsync, os.replace

    def failing(real, *a, **k):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(code, os.strerror(code), str(a[0]) if a else None)
        return real(*a, **k)

    if stage == "serialize":  # what safetensors raises on a full disk (the text of the report)

        def save(tensors, filename, metadata=None):
            calls["n"] += 1
            if calls["n"] > after:
                with open(filename, "wb") as f:  # a half-written temporary file
                    f.write(b"x" * 100)
                raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
            return real_save(tensors, filename, metadata=metadata)

        monkeypatch.setattr("safetensors.torch.save_file", save)
    elif stage == "fsync":
        monkeypatch.setattr(safefile.os, "fsync", lambda fd: failing(real_fsync, fd))
    else:
        monkeypatch.setattr(safefile.os, "replace", lambda a, b: failing(real_replace, a, b))


def safefile_save():
    from safetensors.torch import save_file as real

    return real


@pytest.mark.parametrize("code", STORAGE, ids=[errno.errorcode[c] for c in STORAGE])
@pytest.mark.parametrize("stage", ["serialize", "fsync", "replace"])
def test_storage_errors_are_one_line_and_keep_the_previous_checkpoint(tmp_path, monkeypatch, code, stage):
    folder = tmp_path / "checkpoints"
    first = folder / checkpoint_name(1, 10)
    write_tensors(first, {"a": torch.ones(1000)}, {"format": "interclr-checkpoint"})
    target = folder / checkpoint_name(2, 20)
    _inject(monkeypatch, code, stage)
    kept = f"the previous checkpoint {first} is kept"
    with pytest.raises(StorageError) as e:
        write_tensors(target, {"a": torch.zeros(1000)}, {"format": "interclr-checkpoint"}, kept=kept)
    msg = str(e.value)
    assert e.value.exit_code == 1 and "\n" not in msg
    assert str(target) in msg and os.strerror(code) in msg and kept in msg
    assert "3.9 KB" in msg  # 1000 float32 = 4000 bytes = 3.906 KB
    number, unit = msg.split(" free")[0].rsplit(" ", 2)[-2:]
    shown = float(number) * {"bytes": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[unit]
    free = shutil.disk_usage(tmp_path).free
    assert abs(shown - free) <= 0.01 * free + 2**20, (shown, free)
    # the temporary file is gone and the previous checkpoint is intact (its digest checks)
    assert sorted(p.name for p in folder.iterdir()) == [first.name]
    assert torch.equal(read_tensors(first)[0]["a"], torch.ones(1000))


def test_other_write_errors_are_not_disguised(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise SafetensorError("Error while serializing: something else")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(Exception) as e:
        write_tensors(tmp_path / "x.safetensors", {"a": torch.ones(1)}, {})
    assert not isinstance(e.value, StorageError) and "something else" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_pretraining(tiny_data, tmp_path, monkeypatch):
    """The report's case through the CLI: the second checkpoint hits a full disk."""
    out = tmp_path / "run"
    _inject(monkeypatch, errno.ENOSPC, "serialize", after=1)
    ov = [f"data.root={tiny_data / 'train'}", "train.epochs=1", "train.max_steps=2", "train.ckpt_every_steps=1", *TINY]
    res = run_cli("pretrain", "--preset", "mocov2-r18-cifar", "--out", str(out), "--quiet", *ov)
    assert_clean_error(res, 1, "No space left on device")
    assert "internal error" not in res.stderr
    ckpts = list_checkpoints(out / "checkpoints")
    assert len(ckpts) == 1  # step 1's; step 2's was refused by the disk
    assert f"the previous checkpoint {ckpts[0]} is kept" in res.stderr
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    TrainingCheckpoint(ckpts[0])  # intact, digest checked


def test_any_other_storage_oserror_is_one_line_exit_1(monkeypatch, tmp_path):
    import interclr_cli.commands as commands

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "metrics.jsonl"))

    monkeypatch.setattr(commands, "run_rankme", full)
    res = run_cli("rankme", "random:resnet18", "data.root=builtin:cifar10-mini")
    assert_clean_error(res, 1, "No space left on device")
    assert str(tmp_path / "metrics.jsonl") in res.stderr and "free" in res.stderr and "internal" not in res.stderr


# --- temporary files ----------------------------------------------------------------------------


def test_prune_removes_files_left_by_killed_writers(tmp_path):
    for e in (1, 2):
        write_tensors(tmp_path / checkpoint_name(e, e), {"a": torch.ones(1)}, {})
    dead = tmp_path / f".{checkpoint_name(3, 3)}.999999999.tmp"
    mine = temp_name(tmp_path / checkpoint_name(4, 4))
    other = tmp_path / ".notes.12.tmp"
    for p in (dead, mine, other):
        p.write_bytes(b"partial")
    prune_checkpoints(tmp_path, 5)
    assert not dead.exists() and mine.exists() and other.exists()
    assert len(list_checkpoints(tmp_path)) == 2


def test_slow_write_hook_holds_the_file_in_its_temporary_name(tmp_path, monkeypatch):
    monkeypatch.setenv(safefile.SLOW_WRITE_ENV, "1.0")
    target = tmp_path / "c.safetensors"
    t = threading.Thread(target=write_tensors, args=(target, {"a": torch.ones(4)}, {}))
    t.start()
    deadline = time.time() + 5
    while time.time() < deadline and not temp_name(target).exists():
        time.sleep(0.01)
    seen_tmp, seen_target = temp_name(target).exists(), target.exists()
    t.join()
    assert seen_tmp and not seen_target  # mid-write: only the temporary file
    assert target.exists() and not temp_name(target).exists()


def test_classifier_files_carry_a_digest_and_a_damaged_one_is_refused(tmp_path):
    from interclr_cli.commands.loading import _info, read_classifier, save_classifier

    path = tmp_path / "classifier.safetensors"
    w, b = torch.randn(10, 512), torch.randn(10)
    info = _info("x.safetensors", "export", "resnet18", False)
    save_classifier(path, w, b, info=info, fingerprint="f", classes=[str(i) for i in range(10)])
    assert read_tensors(path)[1][DIGEST_KEY] == _expected_digest({"weight": w, "bias": b}, safefile.CHUNK_BYTES)
    assert torch.equal(read_classifier(path)["weight"], w)
    _flip(path, _data_start(path) + 100)
    with pytest.raises(UserError, match="damaged"):
        read_classifier(path)
