"""Whether a run folder is running, finished or failed: ``status.json`` and how it is read.

The training loop (rank 0) writes ``<run>/status.json`` (atomically: a temporary file, then a
rename): ``state`` ``running`` when the loop is built, with the process's ``pid`` and ``host``,
rewritten with the position (``epoch``, ``step``, ``limit``) at most every :data:`BEAT_SECONDS`
and at every epoch end (the heartbeat, ``updated``); ``finished`` when the loop ends; ``failed``
with the one-line ``error`` when it raises (a non-finite loss, Ctrl-C, any exception).

:func:`run_state` reads a folder into (state, reason):

- ``finished``: status ``finished`` (for finetune and linear-eval also ``result.json``, which
  they write after the loop), or no status but a ``result.json`` (knn, rankme, cluster, older
  runs), or no status and a checkpoint of the planned last epoch;
- ``failed``: status ``failed``; or status ``running`` whose process is gone (same host: ``pid``
  no longer exists; another host: no heartbeat for :data:`STALE_SECONDS`): killed, out of memory;
  or no status, not finished, and none of the run's files (config, metrics, log, checkpoints)
  written for :data:`QUIET_SECONDS`;
- ``running``: otherwise (a live process, or a folder written to recently).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from ..runtime import dist
from ..runtime.safefile import StorageError, atomic_write_bytes

STATUS_FILE = "status.json"
RESULT_FILE = "result.json"
BEAT_SECONDS = 30.0
STALE_SECONDS = 3600.0
QUIET_SECONDS = 600.0
#: commands that write result.json after their training loop
_RESULT_AFTER_LOOP = {"finetune", "linear-eval"}


class RunStatus:
    """Rank 0's ``status.json`` of ``run_dir`` for ``command``; a no-op on other ranks."""

    def __init__(self, run_dir: Path, command: str, limit: int, epochs: int):
        self.path = Path(run_dir) / STATUS_FILE
        self.enabled = dist.is_main() and Path(run_dir).is_dir()
        self.last_beat = 0.0
        self.body = {
            "state": "running",
            "command": command,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "limit": limit,
            "epochs": epochs,
        }

    def _write(self, **fields) -> None:
        if not self.enabled:
            return
        self.body.update(fields, updated=time.time())
        try:
            atomic_write_bytes(self.path, (json.dumps(self.body) + "\n").encode("utf-8"))
        except (OSError, StorageError):  # a status file must never stop training
            pass

    def start(self) -> None:
        """``running``, before the position is known (InterCLR's k-means may come first)."""
        self._write(state="running")

    def beat(self, epoch: int, step: int, force: bool = False) -> None:
        """The heartbeat at the loop's position (throttled unless ``force``)."""
        now = time.monotonic()
        if force or now - self.last_beat >= BEAT_SECONDS:
            self.last_beat = now
            self._write(state="running", epoch=epoch, step=step)

    def finish(self, epoch: int, step: int) -> None:
        self._write(state="finished", epoch=epoch, step=step)

    def fail(self, error: str) -> None:
        self._write(state="failed", error=error.splitlines()[0] if error else "interrupted")


def read_status(run_dir: Path) -> Optional[dict]:
    """The folder's ``status.json``, or None when it has none (or it is unreadable)."""
    try:
        data = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return True


def _live_state(status: dict, now: float) -> tuple[str, str]:
    """running/failed for a status whose process should still be working."""
    host, pid = status.get("host"), status.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        if _process_alive(pid):
            return "running", f"process {pid} is alive"
        return "failed", f"process {pid} ended without finishing (killed?)"
    age = now - float(status.get("updated", status.get("started", 0.0)))
    if age < STALE_SECONDS:
        return "running", f"heartbeat {age:.0f} s ago on {host}"
    return "failed", f"no heartbeat for {age / 3600:.1f} h (on {host})"


#: what a run itself writes as it goes (a report written into the folder does not count)
_RUN_WRITES = ("config.yaml", "run.json", "metrics.jsonl", "train.log", "file_index.txt", "checkpoints")


def newest_write(run_dir: Path) -> float:
    """The newest modification time of what the run writes (:data:`_RUN_WRITES`)."""
    times = []
    for name in _RUN_WRITES:
        try:
            times.append((Path(run_dir) / name).stat().st_mtime)
        except OSError:
            continue
    return max(times, default=Path(run_dir).stat().st_mtime)


def run_state(run_dir: Path, final_checkpoint: bool, now: Optional[float] = None) -> tuple[str, str]:
    """(``running`` | ``finished`` | ``failed``, reason) of ``run_dir`` (see the module doc);
    ``final_checkpoint``: the folder holds a checkpoint of the planned last epoch."""
    now = time.time() if now is None else now
    run_dir = Path(run_dir)
    has_result = (run_dir / RESULT_FILE).is_file()
    status = read_status(run_dir)
    if status is not None:
        state = status.get("state")
        if state == "failed":
            return "failed", str(status.get("error", ""))
        if state == "finished" and (has_result or status.get("command") not in _RESULT_AFTER_LOOP):
            return "finished", ""
        return _live_state(status, now)
    if has_result or final_checkpoint:
        return "finished", ""
    age = now - newest_write(run_dir)
    if age < QUIET_SECONDS:
        return "running", f"written {age:.0f} s ago"
    return "failed", f"nothing written for {age / 60:.0f} min and no result"


__all__ = ["RESULT_FILE", "STATUS_FILE", "RunStatus", "newest_write", "read_status", "run_state"]
