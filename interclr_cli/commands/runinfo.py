"""Reading run folders back: config, metrics, result and state, for ``report`` and ``runs``.

A run folder is one that holds ``config.yaml`` (the marker every command writes first). Every
file is read tolerantly, so a run still training, killed mid-write or from an older version is
summarised rather than refused: a ``metrics.jsonl`` line cut short is skipped, an unreadable
``config.yaml`` reads as empty.

Records after a resume: a record whose step (``type: step``) or epoch (``type: epoch`` and
``monitor``) is not past the previous one of its kind starts a new session, and the earlier
records it replaces (from its step or epoch on) are dropped, as TensorBoard's reader does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import UserError
from ..training.checkpoint import checkpoint_name, list_checkpoints
from ..training.rundir import RUN_MARKER
from ..training.runstatus import RESULT_FILE, read_status, run_state

#: commands whose runs train with the loop (epochs planned in the config)
TRAINING_COMMANDS = ("pretrain", "finetune", "linear-eval")


def read_records(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (see the module doc for resumes); [] when absent."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    out: list[dict] = []
    newest: dict[str, float] = {}  # kind -> the newest step / epoch seen
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        axis = _axis(rec)
        if axis is not None and isinstance(rec.get(axis), (int, float)):
            kind, at = _kinds(rec), rec[axis]
            if at <= newest.get(kind, -1):  # a resumed session
                out = [r for r in out if not (_kinds(r) == kind and r.get(axis, -1) >= at)]
            newest[kind] = at
        out.append(rec)
    return out


def _axis(rec: dict) -> Optional[str]:
    return {"step": "step", "epoch": "epoch", "monitor": "epoch"}.get(rec.get("type"))


def _kinds(rec: dict) -> str:
    return "step" if rec.get("type") == "step" else "epoch"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass
class RunInfo:
    """One run folder read back."""

    path: Path
    command: str
    config: dict
    records: list[dict]
    result: dict
    source: str
    state: str
    reason: str
    checkpoints: list[Path] = field(default_factory=list)
    #: the name shown (the folder's; see :func:`unique_labels`)
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.path.name

    def setting(self, key: str) -> Any:
        """The config value of the dotted ``key`` (None when absent)."""
        node: Any = self.config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    def series(self, kind: str, key: str) -> tuple[list[float], list[float]]:
        """(x, y) of ``key`` over the ``kind`` records: ``step`` (x: global step) or ``epoch``
        (epoch and monitor records; x: epoch, 0 = before training)."""
        xs, ys = [], []
        axis = "step" if kind == "step" else "epoch"
        for r in self.records:
            if _kinds(r) != kind or r.get("type") not in ("step", "epoch", "monitor"):
                continue
            v = r.get(key)
            if axis in r and isinstance(v, (int, float)) and not isinstance(v, bool):
                xs.append(float(r[axis]))
                ys.append(float(v))
        return xs, ys

    def keys(self, kind: str) -> list[str]:
        """The numeric fields of the ``kind`` records, in first-seen order."""
        seen: dict[str, None] = {}
        for r in self.records:
            if _kinds(r) == kind and r.get("type") in ("step", "epoch", "monitor"):
                for k, v in r.items():
                    if k not in ("type", "epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                        seen.setdefault(k, None)
        return list(seen)

    def last(self, key: str) -> Optional[float]:
        """The newest value of ``key`` in the epoch/monitor records, else in ``result.json``."""
        _, ys = self.series("epoch", key)
        if ys:
            return ys[-1]
        v = self.result.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    @property
    def epochs_done(self) -> int:
        xs = [r["epoch"] for r in self.records if r.get("type") == "epoch" and isinstance(r.get("epoch"), int)]
        return max(xs, default=0)

    @property
    def epochs_planned(self) -> Optional[int]:
        if self.command not in TRAINING_COMMANDS:
            return None
        epochs = self.setting("train.epochs")
        return int(epochs) if isinstance(epochs, int) else None


def summarise(run: RunInfo) -> dict[str, Any]:
    """The figures ``runs`` and ``report`` show for a run (None where a run has no such figure):
    ``name``, ``path``, ``command``, ``method`` (pretrain), ``preset``, ``status``, ``reason``,
    ``epochs_done``, ``epochs_planned``, ``steps``, ``loss`` (the last epoch's mean), ``knn_top1``,
    ``rankme``, ``rankme_backbone``, ``top1``/``top5`` (finetune, linear-eval), ``img_per_s``
    (median of the step records)."""
    steps = [r["step"] for r in run.records if isinstance(r.get("step"), int)]
    rates = sorted(run.series("step", "img_per_s")[1])
    loss = run.last("loss")
    return {
        "name": run.name,
        "path": str(run.path),
        "command": run.command,
        "method": run.setting("method.name") if run.command == "pretrain" else None,
        "preset": run.setting("name") or None,
        "status": run.state,
        "reason": run.reason,
        "epochs_done": run.epochs_done if run.epochs_planned is not None else None,
        "epochs_planned": run.epochs_planned,
        "steps": max(steps, default=None),
        "loss": loss if loss is not None else run.last("train_loss"),
        "knn_top1": run.last("knn_top1"),
        "rankme": run.last("rankme"),
        "rankme_backbone": run.last("rankme_backbone"),
        "top1": run.last("top1") if run.command != "pretrain" else None,
        "top5": run.last("top5") if run.command != "pretrain" else None,
        "img_per_s": rates[len(rates) // 2] if rates else None,
    }


def _command(path: Path, run_json: dict, status: Optional[dict]) -> str:
    if isinstance(run_json.get("command"), str):
        return run_json["command"]
    if status and isinstance(status.get("command"), str):
        return status["command"]
    return "pretrain"  # the one command that writes no run.json


def read_run(path: Path) -> RunInfo:
    """Read the run folder ``path`` (an error when it is not one)."""
    path = Path(path)
    if not (path / RUN_MARKER).is_file():
        raise UserError(f"{path} is not an interclr run folder (no {RUN_MARKER}); pass a folder under runs/")
    run_json = _read_json(path / "run.json")
    command = _command(path, run_json, read_status(path))
    config = _read_yaml(path / RUN_MARKER)
    ckpts = list_checkpoints(path / "checkpoints")
    info = RunInfo(
        path=path,
        command=command,
        config=config,
        records=read_records(path / "metrics.jsonl"),
        result=_read_json(path / RESULT_FILE),
        source=str(run_json.get("source", "")),
        state="",
        reason="",
        checkpoints=ckpts,
    )
    planned = info.epochs_planned
    final = planned is not None and any(p.name.startswith(checkpoint_name(planned, 0).split("-s")[0]) for p in ckpts)
    info.state, info.reason = run_state(path, final)
    return info


def find_runs(root: Path, max_depth: int = 3) -> list[Path]:
    """Run folders at or under ``root`` (not inside another run), oldest first by config.yaml."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; pass the folder that holds your runs (default: runs)")
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        if (folder / RUN_MARKER).is_file():
            found.append(folder)
            return
        if depth >= max_depth:
            return
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            walk(sub, depth + 1)

    walk(root, 0)
    return sorted(found, key=lambda p: ((p / RUN_MARKER).stat().st_mtime, str(p)))


def unique_labels(runs: list[RunInfo]) -> None:
    """Label each run by its folder name, or by ``parent/name`` where two folders share a name."""
    names = [r.path.name for r in runs]
    for r in runs:
        r.label = f"{r.path.parent.name}/{r.path.name}" if names.count(r.path.name) > 1 else r.path.name


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (resolved; else their last three parts agree:
    <run>/checkpoints/<file>, for a run folder moved or named from another directory)."""
    try:
        if a.resolve() == b.resolve():
            return True
    except OSError:
        pass
    return len(a.parts) >= 3 and a.parts[-3:] == b.parts[-3:]


def config_differences(runs: list[RunInfo]) -> list[tuple[str, list[Any]]]:
    """(key, value per run) of the config keys whose values differ between ``runs``
    (``description`` left out); [] for one run."""
    if len(runs) < 2:
        return []
    flats = [flatten(r.config) for r in runs]
    keys = sorted({k for f in flats for k in f} - {"description"})
    out = []
    for k in keys:
        values = [f.get(k) for f in flats]
        if any(v != values[0] for v in values[1:]):
            out.append((k, values))
    return out


__all__ = [
    "RunInfo",
    "TRAINING_COMMANDS",
    "config_differences",
    "find_runs",
    "flatten",
    "read_records",
    "read_run",
    "same_file",
    "summarise",
    "unique_labels",
]
