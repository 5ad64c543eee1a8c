"""Labelled subsets for semi-supervised evaluation (ImageNet 1% / 10% protocol of SimCLR)."""

from __future__ import annotations

import math
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import UserError


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-stratified random subset.

    Each class c with n_c samples contributes round(fraction * n_c) samples (halves round up),
    at least one, drawn without replacement by ``numpy.random.default_rng(seed)``.
    """
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        fraction = math.nan
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise UserError(f"label fraction must be in (0, 1], got {fraction}; e.g. 0.01 for 1% of the labels")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise UserError(f"labels must be a 1-D array, got shape {labels.shape}")
    if labels.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    _, starts = np.unique(labels[order], return_index=True)
    groups = np.split(order, starts[1:])
    rng = np.random.default_rng(seed)
    picked = []
    for idx in groups:
        k = max(1, int(math.floor(fraction * len(idx) + 0.5)))
        picked.append(rng.choice(idx, size=min(k, len(idx)), replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _parts(path: str) -> tuple[str, ...]:
    return PurePosixPath(path.replace("\\", "/")).parts


def subset_from_list(paths: list[str], list_file: Path) -> np.ndarray:
    """Sorted indices of ``paths`` named in ``list_file``.

    One entry a line; the first whitespace-separated field counts (so ``name label`` lines
    work), blank lines and ``#`` comments are skipped. An entry without a slash, like
    ``n01440764_10026.JPEG`` in the canonical ImageNet 1%/10% lists, matches the file name; one
    with slashes, like ``n01440764/n01440764_10026.JPEG``, matches the trailing path components.
    """
    list_file = Path(list_file)
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the subset list {list_file}: {e.__class__.__name__}; check the path") from None
    entries = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(line.split()[0])
    if not entries:
        raise UserError(f"the subset list {list_file} names no files; one file name a line is expected")

    parts = [_parts(p) for p in paths]
    by_suffix: dict[int, dict[tuple[str, ...], list[int]]] = {}

    def index(depth: int) -> dict[tuple[str, ...], list[int]]:
        if depth not in by_suffix:
            table: dict[tuple[str, ...], list[int]] = {}
            for i, p in enumerate(parts):
                if len(p) >= depth:
                    table.setdefault(p[-depth:], []).append(i)
            by_suffix[depth] = table
        return by_suffix[depth]

    chosen: set[int] = set()
    missing: list[str] = []
    for entry in entries:
        key = tuple(x for x in _parts(entry) if x not in ("", "."))
        hits = index(len(key)).get(key, []) if key else []
        if not hits:
            missing.append(entry)
        elif len(hits) > 1:
            raise UserError(
                f"subset entry {entry!r} of {list_file} matches {len(hits)} files; write it with its class folder"
            )
        else:
            chosen.add(hits[0])
    if missing:
        raise UserError(
            f"{len(missing)} of {len(entries)} entries of {list_file} are not in the dataset, first {missing[0]!r}; "
            "check the data folder or the list"
        )
    return np.array(sorted(chosen), dtype=np.int64)
