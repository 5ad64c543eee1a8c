"""Data sets shipped inside the package, named ``builtin:NAME`` in ``data.root``."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"

# cifar10-mini: 500 train + 100 test images per CIFAR-10 class; see its README.md and
# tools/make_builtin.py.
BUILTIN_DATASETS: dict[str, Path] = {
    "cifar10-mini": BUILTIN_DIR / "cifar10-mini",
}

PREFIX = "builtin:"


def resolve_builtin(name: str) -> Path:
    """The folder of a shipped data set; ``name`` may carry the ``builtin:`` prefix."""
    if name.startswith(PREFIX):
        name = name[len(PREFIX) :]
    if name not in BUILTIN_DATASETS:
        available = ", ".join(f"builtin:{n}" for n in sorted(BUILTIN_DATASETS))
        raise UserError(f"unknown built-in data set {name!r}; available: {available}")
    path = BUILTIN_DATASETS[name]
    if not path.is_dir():
        raise UserError(f"built-in data set {name!r} is missing at {path}; reinstall interclr (pip install -e .)")
    return path
