"""Count the host-device synchronisations that interclr's own code asks for (shared by the benchmarks
and the tests; not part of the package).

:class:`SyncCounter` is a context manager that wraps the calls which make the host wait for the
device (or, on the CPU, turn a tensor into a Python value, which would wait on a GPU):

    Tensor.item / .tolist / .__bool__ / .__int__ / .__float__ / .__index__ / .nonzero / .cpu /
    .numpy, torch.nonzero, and indexing or index-assignment with a boolean mask (t[mask],
    t[mask] = v)

and records a call when the frame that made it is a file under one of ``roots`` (by default the
``interclr_cli`` package): ``direct``. A call made by a library function (torch, torchvision)
that was itself called from a file under ``roots`` is counted apart, as ``indirect``. A CPU run
cannot tell a CUDA tensor from a CPU one, so both are counted. Calls nested inside a counted one
(e.g. a ``tolist`` made by torch's own ``__format__``) are counted once. On exit every patched
attribute is put back exactly as it was.

    with SyncCounter() as sc:
        for _ in range(20):
            step()
    sc.direct, sc.indirect, sc.sites        # totals and a Counter {"memory/bank.py:97 getitem[bool]": n}

:func:`sync_debug_error` runs a function under ``torch.cuda.set_sync_debug_mode("error")`` (CUDA
only), which raises on any synchronising CUDA call, and says whether it raised and where.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

PACKAGE = Path(__file__).resolve().parent.parent / "interclr_cli"
HERE = str(Path(__file__).resolve())

#: torch.Tensor attributes that always synchronise (or make a Python value of a tensor)
TENSOR_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")
#: torch.Tensor attributes that synchronise when indexed with a boolean mask
MASK_METHODS = ("__getitem__", "__setitem__")
#: torch module functions that always synchronise
TORCH_FUNCTIONS = ("nonzero",)

_MISSING = object()


def _has_bool_mask(index) -> bool:
    """True when an index (a tensor, a list or a tuple of them) holds a boolean tensor."""
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool
    if isinstance(index, (tuple, list)):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return False


class SyncCounter:
    """Counts synchronising calls made from files under ``roots`` while the context is entered."""

    def __init__(self, roots: Optional[Iterable[str | Path]] = None, stack_depth: int = 40):
        self.roots = tuple(str(Path(r).resolve()) + "/" for r in (roots or (PACKAGE,)))
        self.stack_depth = stack_depth
        self.sites: Counter = Counter()  # "relative/path.py:line kind" -> calls (direct)
        self.indirect_sites: Counter = Counter()  # the first frame under roots, for library calls
        self._saved: list[tuple[object, str, object]] = []
        self._local = threading.local()

    # -- totals ------------------------------------------------------------------------------------
    @property
    def direct(self) -> int:
        """Calls made by code under ``roots`` itself."""
        return sum(self.sites.values())

    @property
    def indirect(self) -> int:
        """Calls made by library code that code under ``roots`` called."""
        return sum(self.indirect_sites.values())

    def reset(self) -> None:
        """Forget what was counted so far (e.g. after warm-up steps)."""
        self.sites.clear()
        self.indirect_sites.clear()

    def summary(self, steps: int = 1) -> dict:
        """Per-step totals and the sites, as plain JSON-able values."""
        steps = max(1, int(steps))
        return {
            "direct_per_step": self.direct / steps,
            "indirect_per_step": self.indirect / steps,
            "steps": steps,
            "sites": dict(self.sites.most_common()),
            "indirect_sites": dict(self.indirect_sites.most_common()),
        }

    # -- recording ---------------------------------------------------------------------------------
    def _inside(self, filename: str) -> bool:
        return filename.startswith(self.roots)

    def _site(self, frame, kind: str) -> str:
        path = frame.f_code.co_filename
        for root in self.roots:
            if path.startswith(root):
                path = path[len(root) :]
                break
        return f"{path}:{frame.f_lineno} {kind}"

    def _record(self, kind: str) -> None:
        frame = sys._getframe(2)  # 0: _record, 1: the wrapper, 2: the caller
        if self._inside(frame.f_code.co_filename):
            self.sites[self._site(frame, kind)] += 1
            return
        up, depth = frame.f_back, 0
        while up is not None and depth < self.stack_depth:
            if self._inside(up.f_code.co_filename):
                self.indirect_sites[self._site(up, kind)] += 1
                return
            up, depth = up.f_back, depth + 1

    def _wrap(self, original: Callable, kind: str, needs_mask: bool) -> Callable:
        local = self._local

        def wrapper(*args, **kwargs):
            if getattr(local, "busy", False):  # nested in a counted call: counted once
                return original(*args, **kwargs)
            if not needs_mask or _has_bool_mask(args[1] if len(args) > 1 else None):
                self._record(kind)
            local.busy = True
            try:
                return original(*args, **kwargs)
            finally:
                local.busy = False

        wrapper.__name__ = getattr(original, "__name__", kind)
        return wrapper

    def _patch(self, owner, name: str, kind: str, needs_mask: bool = False) -> None:
        self._saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, self._wrap(getattr(owner, name), kind, needs_mask))

    def __enter__(self) -> "SyncCounter":
        for name in TENSOR_METHODS:
            self._patch(torch.Tensor, name, name.strip("_"))
        for name in MASK_METHODS:
            self._patch(torch.Tensor, name, name.strip("_") + "[bool]", needs_mask=True)
        for name in TORCH_FUNCTIONS:
            self._patch(torch, name, "torch." + name)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, before in reversed(self._saved):
            if before is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, before)
        self._saved.clear()


def _deepest_frame(exc: BaseException, roots: tuple[str, ...]) -> Optional[str]:
    """'path:line' of the deepest traceback frame under ``roots`` (where a sync was asked for)."""
    where = None
    for fs in traceback.extract_tb(exc.__traceback__):
        name = str(Path(fs.filename).resolve())
        for root in roots:
            if name.startswith(root):
                where = f"{name[len(root) :]}:{fs.lineno}"
    return where


def sync_debug_error(fn: Callable[[], None], roots: Optional[Iterable[str | Path]] = None) -> dict:
    """Run ``fn`` under ``torch.cuda.set_sync_debug_mode("error")`` (CUDA must be available).

    Returns ``{"raised": bool, "message": first line or None, "where": 'path:line' under roots}``;
    the debug mode is always put back to its previous value.
    """
    roots_t = tuple(str(Path(r).resolve()) + "/" for r in (roots or (PACKAGE,)))
    before = torch.cuda.get_sync_debug_mode()
    out = {"raised": False, "message": None, "where": None}
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        out = {"raised": True, "message": lines[0][:300], "where": _deepest_frame(e, roots_t)}
    finally:
        torch.cuda.set_sync_debug_mode(before)  # before the synchronize below, which would raise
    torch.cuda.synchronize()
    return out


__all__ = ["PACKAGE", "SyncCounter", "sync_debug_error"]
