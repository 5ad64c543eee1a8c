"""Output files that prove their integrity, and storage failures as one-line errors.

Every safetensors file interclr writes (training checkpoints, exports, classifiers, centroids)
goes through :func:`write_tensors`, every one it reads through :func:`read_tensors`.

**Digest.** ``write_tensors`` hashes the tensor data it hands to safetensors (in memory, before
the bytes go to disk; the file is never read back) and stores the result in the metadata under
``interclr.digest`` as ``sha256:<64 hex digits>``. The construction (version 1), so that any tool
can check a file::

    for each tensor, names in sorted order:
        chunk_hashes = sha256 of each consecutive 64 MiB piece of its raw little-endian bytes
        line = f"{name}\\t{dtype}\\t{shape}\\t{','.join(chunk hex digests)}\\n"   # dtype: float32, bfloat16, ...
    digest = sha256(b"interclr-digest-1\\n" + all lines, UTF-8)                  # shape: e.g. [64, 3, 7, 7]

The pieces are hashed by a thread pool (``hashlib`` releases the GIL), so the cost is the memory
bandwidth of the cores, not one core's. ``read_tensors`` recomputes it over the loaded tensors and
refuses a mismatch (a flipped bit on a bad disk, a copy cut short) with a one-line
:class:`~interclr_cli.errors.UserError`; files without a digest (written by other tools) load
as before. :func:`verification` turns the check off for a block (the commands' ``--no-verify``).

**Writes.** A file is written to ``.<name>.<pid>.tmp`` beside the target, fsynced and renamed
onto it, so the target is either the old file or the complete new one. A storage error (disk
full, quota, read-only or unwritable folder, I/O error) removes the temporary file and becomes a
:class:`StorageError` (exit code 1): one line naming the path, the bytes being written, the free
space, and what was kept.

``INTERCLR_TEST_SLOW_WRITE=SECONDS`` (tests and ``benchmarks/fault_drill.py`` only): sleep that
long after the temporary file is written and before it is renamed, so that a kill can land while
a checkpoint is being written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

import torch

from ..errors import UserError, WorkError

DIGEST_KEY = "interclr.digest"
DIGEST_ALGO = "sha256"
DIGEST_VERSION = b"interclr-digest-1\n"
CHUNK_BYTES = 64 << 20
SLOW_WRITE_ENV = "INTERCLR_TEST_SLOW_WRITE"
#: errno values that mean "the storage refused", not "interclr has a bug"
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG})

_verify = True


class StorageError(WorkError):
    """The storage refused a write (exit code 1); the target file is unchanged."""


# --- digest ---------------------------------------------------------------------------------------


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (any dtype, 0-d and empty included)."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` of ``tensors`` (contiguous CPU tensors) as the module docstring defines it."""
    names = sorted(tensors)
    views = {k: _raw_bytes(tensors[k]) for k in names}
    pieces = [(k, i) for k in names for i in range(0, max(1, len(views[k])), CHUNK_BYTES)]

    def piece_hash(p: tuple[str, int]) -> str:
        k, i = p
        return hashlib.sha256(views[k][i : i + CHUNK_BYTES]).hexdigest()

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        hashes = list(pool.map(piece_hash, pieces, chunksize=8))
    per_tensor: dict[str, list[str]] = {k: [] for k in names}
    for (k, _), h in zip(pieces, hashes):
        per_tensor[k].append(h)
    top = hashlib.sha256(DIGEST_VERSION)
    for k in names:
        t = tensors[k]
        dtype = str(t.dtype).removeprefix("torch.")
        top.update(f"{k}\t{dtype}\t{list(t.shape)}\t{','.join(per_tensor[k])}\n".encode())
    return f"{DIGEST_ALGO}:{top.hexdigest()}"


def set_verify(enabled: bool) -> None:
    """Check digests on every :func:`read_tensors` (the default) or not."""
    global _verify
    _verify = bool(enabled)


def verify_enabled() -> bool:
    return _verify


@contextlib.contextmanager
def verification(enabled: bool) -> Iterator[None]:
    """Digest checks on or off for the block (``--no-verify``); the previous setting afterwards."""
    before = _verify
    set_verify(enabled)
    try:
        yield
    finally:
        set_verify(before)


def check_digest(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
    """Raise a one-line UserError if ``meta`` carries a digest that ``tensors`` do not match."""
    stored = meta.get(DIGEST_KEY)
    if stored is None:
        return  # written by another tool: accepted as it is
    if not stored.startswith(f"{DIGEST_ALGO}:"):
        raise UserError(
            f"{path} carries a digest of an unknown kind ({stored.split(':')[0]!r}); "
            "upgrade interclr, or pass --no-verify to load it unchecked"
        )
    if tensor_digest(tensors) != stored:
        raise UserError(
            f"{path} is damaged: its tensor data does not match the {DIGEST_ALGO} digest written with it "
            "(a bad disk or an incomplete copy); use an earlier checkpoint, or pass --no-verify to load it anyway"
        )


# --- storage errors -------------------------------------------------------------------------------


def _size(n: Optional[int]) -> str:
    if n is None:
        return "unknown size"
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} bytes"


def free_space(folder: Path) -> str:
    """Free space of the file system holding ``folder`` (its nearest existing ancestor), as text."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{_size(shutil.disk_usage(p).free)} free"
    except OSError:
        return "free space unknown"


def is_storage_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in STORAGE_ERRNOS


def storage_error(e: OSError, path: Path, size: Optional[int] = None, kept: Optional[str] = None) -> StorageError:
    """The one-line :class:`StorageError` for ``e`` raised while writing ``path`` (``size`` bytes)."""
    path = Path(path)
    reason = os.strerror(e.errno) if e.errno else str(e)
    kept = kept or (f"the existing {path.name} is unchanged" if path.exists() else f"{path.name} was not written")
    return StorageError(
        f"cannot write {path} ({reason}): writing {_size(size)} with {free_space(path.parent)} there; "
        f"{kept} and the partial file removed; free some space or choose another output folder, then run again"
    )


def storage_error_from(e: OSError) -> StorageError:
    """The one-line :class:`StorageError` for a storage OSError raised by any other write (a log, a
    metrics line, a CSV): the path when the error names one, and its free space."""
    reason = os.strerror(e.errno) if e.errno else str(e)
    where = (
        f"cannot write {e.filename} ({reason}); {free_space(Path(e.filename).parent)} there" if e.filename else reason
    )
    return StorageError(
        f"{where}; files written before are kept; free some space or choose another output folder, then run again"
    )


def _oserror_from_safetensors(e: Exception, tmp: Path) -> Optional[OSError]:
    """safetensors reports I/O failures as ``... (os error 28)``: the OSError it stands for, if any."""
    text = str(e)
    marker = "(os error "
    if marker not in text:
        return None
    try:
        code = int(text.split(marker, 1)[1].split(")", 1)[0])
    except ValueError:
        return None
    return OSError(code, os.strerror(code), str(tmp))


# --- atomic writes ----------------------------------------------------------------------------------


def temp_name(path: Path) -> Path:
    """The temporary file beside ``path`` that :func:`atomic_target` writes: ``.<name>.<pid>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # make the rename durable where folders can be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_target(
    out: Path, *, size: Optional[int] = None, kept: Optional[str] = None, slow: bool = False
) -> Iterator[Path]:
    """Yield a temporary path beside ``out`` for the caller to write; then fsync it and rename it
    onto ``out``. On any failure the temporary file is removed; storage errors (see
    :data:`STORAGE_ERRNOS`) become a :class:`StorageError` naming ``out``, ``size`` and ``kept``."""
    out = Path(out)
    tmp = temp_name(out)
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            if slow and os.environ.get(SLOW_WRITE_ENV):
                time.sleep(float(os.environ[SLOW_WRITE_ENV]))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, out)
        except OSError as e:
            if is_storage_error(e):
                written = size if size is not None else (tmp.stat().st_size if tmp.exists() else None)
                raise storage_error(e, out, written, kept) from None
            raise
        _fsync_dir(out.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write_bytes(out: Path, data: bytes, *, kept: Optional[str] = None) -> None:
    """Write ``data`` to ``out`` atomically (see :func:`atomic_target`)."""
    with atomic_target(out, size=len(data), kept=kept) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def _cpu_contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; those sharing storage with an earlier one are copied
    (safetensors refuses shared storage), the others are not."""
    out, seen = {}, set()
    for k, v in tensors.items():
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = t
    return out


def write_tensors(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    kept: Optional[str] = None,
    digest: bool = True,
) -> int:
    """Write ``tensors`` and ``metadata`` (plus ``interclr.digest``) to the safetensors file ``path``
    atomically; returns the file's size in bytes. ``kept``: what the error message says survives a
    failed write (default: the existing file, or that nothing was written)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    clean = _cpu_contiguous(tensors)
    meta = {str(k): str(v) for k, v in metadata.items()}
    if digest:
        meta[DIGEST_KEY] = tensor_digest(clean)
    size = sum(t.numel() * t.element_size() for t in clean.values())
    with atomic_target(path, size=size, kept=kept, slow=True) as tmp:
        try:
            save_file(clean, str(tmp), metadata=meta)
        except SafetensorError as e:
            os_err = _oserror_from_safetensors(e, tmp)
            if os_err is not None:
                raise os_err from None
            raise WorkError(f"cannot write {path}: {str(e).splitlines()[0][:160]}") from None
    return path.stat().st_size


def read_tensors(
    path: Path, *, verify: Optional[bool] = None, on_error: Optional[Callable[[str], Exception]] = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a safetensors file, its digest checked (unless ``verify``
    is False, or None and :func:`verification` is off). An unreadable file raises
    ``on_error(reason)`` (default: a one-line UserError naming the file).

    When verifying, the tensors are read into memory (safetensors' ``pread`` backend, where it has
    one) rather than mapped: hashing mapped pages costs a page fault each (measurements:
    benchmarks/README.md, "Checkpoint digests")."""
    from safetensors import SafetensorError

    verify = _verify if verify is None else verify
    try:
        meta, tensors = _load(Path(path), "pread" if verify else None)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise (on_error(reason) if on_error else UserError(f"cannot read {path} as safetensors ({reason})")) from None
    if verify:
        check_digest(path, tensors, meta)
    return tensors, meta


def _load(path: Path, backend: Optional[str]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        f = safe_open(str(path), framework="pt", **({"backend": backend} if backend else {}))
    except TypeError:  # a safetensors without backends
        f = safe_open(str(path), framework="pt")
    with f:
        meta = dict(f.metadata() or {})
        tensors = f.get_tensors() if hasattr(f, "get_tensors") else {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors
