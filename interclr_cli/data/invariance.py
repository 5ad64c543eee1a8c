"""The sets of images ``interclr invariance`` measures: augmentation families and set files.

**Augmentation families.** Each image of a seeded subset of ``data.root`` gives one set: view 0
is the image itself (the evaluation transform: resize, centre crop, normalise) and views 1..K-1
are that image under one family alone, drawn per image from a seed that is a function of
``(seed, family, view)`` and the image's position (:func:`view_seed`; the extraction hashes it
with the position), so every checkpoint sees the same images and the same views, on any device:

========== ====================================================================================
crop       RandomResizedCrop of the centre crop, scale (0.2, 1), ratio (3/4, 4/3): what the crop
           keeps and what it occludes change (MoCo v2's crop range)
occlusion  a rectangle of 10-40% of the image (ratio 0.3-3.3) set to the data mean (RandomErasing
           after normalisation, value 0)
colour     ColorJitter(brightness 0.4, contrast 0.4, saturation 0.4, hue 0.1) (MoCo v2's strengths)
flip       the horizontal mirror image (2 views)
blur       Gaussian blur, sigma ~ U(0.1, 2.0), 2 * ceil(2 sigma_max) + 1 = 9 taps (at most the
           largest odd size below the image size), reflect padding
grayscale  the grey image, three equal channels (2 views)
rotation   rotation by an angle ~ U(-30, 30) degrees about the centre, bilinear, corners filled
           with the data mean
========== ====================================================================================

**Set files.** ``path,set_id[,label]`` CSV rows (an optional header row naming those columns;
``#`` starts a comment line; relative paths are resolved against the file's folder): the images of
one set are the views of one object (viewpoint), the instances of one category (instance), one
scene under several lights (illumination) ... ``label`` (any string, optional: all rows or none)
groups sets into classes for the score's per-class average. :func:`read_set_file` checks the file
(columns, sets of one image, labels, missing and unreadable images) with one-line errors.
"""

from __future__ import annotations

import csv
import math
import os
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from PIL import Image
from torchvision import transforms as T

from ..config.schema import DataConfig, InvarianceFamily
from ..errors import UserError
from .samplers import hashed_seed
from .transforms import GaussianBlur

#: Every family, in the schema's order (the one list of them: ``invariance.augment``'s values).
FAMILIES: tuple[str, ...] = typing.get_args(InvarianceFamily)
#: Families with one transformed version only: their sets are (image, transformed image).
TWO_VIEW = frozenset({"flip", "grayscale"})

CROP_SCALE = (0.2, 1.0)
ERASE_SCALE = (0.1, 0.4)
JITTER = (0.4, 0.4, 0.4, 0.1)
BLUR_SIGMA = (0.1, 2.0)
ROTATION_DEGREES = 30.0


def family_views(family: str, views: int) -> int:
    """The number of views per image of ``family`` (2 for flip and grayscale, else ``views``)."""
    if family not in FAMILIES:
        raise UserError(f"unknown augmentation family {family!r}; use one of {', '.join(FAMILIES)}")
    return 2 if family in TWO_VIEW else int(views)


def view_seed(seed: int, family: str, view: int) -> int:
    """A 63-bit seed of ``(seed, family, view)`` alone (:func:`~.samplers.hashed_seed`)."""
    return hashed_seed(seed, FAMILIES.index(family), view, 0x1A7)


def _blur_taps(size: int) -> int:
    taps = 2 * math.ceil(2 * BLUR_SIGMA[1]) + 1
    largest = size - 1 if size % 2 == 0 else size - 2
    return max(1, min(taps, largest))


def _family_op(family: str, cfg: DataConfig) -> list[Callable]:
    """The PIL-side operation of ``family`` on the centre crop (before ToTensor)."""
    size = cfg.image_size
    fill = tuple(int(round(255 * m)) for m in cfg.mean)
    ops: dict[str, list[Callable]] = {
        "crop": [T.RandomResizedCrop(size, scale=CROP_SCALE)],
        "occlusion": [],
        "colour": [T.ColorJitter(*JITTER)],
        "flip": [T.functional.hflip],
        "blur": [GaussianBlur(_blur_taps(size), sigma=BLUR_SIGMA)],
        "grayscale": [T.Grayscale(num_output_channels=3)],
        "rotation": [T.RandomRotation(ROTATION_DEGREES, interpolation=T.InterpolationMode.BILINEAR, fill=fill)],
    }
    return ops[family]


def view_transform(family: Optional[str], cfg: DataConfig) -> T.Compose:
    """The transform of a view: the evaluation resize and centre crop, then ``family``'s random
    operation (None: the untransformed view 0), then normalisation. Random draws come from torch's
    global RNG, which the extraction seeds per image."""
    resize = max(cfg.eval_resize, cfg.image_size)
    head = [T.Resize(resize), T.CenterCrop(cfg.image_size)]
    op = _family_op(family, cfg) if family is not None else []
    tail: list[Callable] = [T.ToTensor(), T.Normalize(mean=list(cfg.mean), std=list(cfg.std))]
    if family == "occlusion":
        tail.append(T.RandomErasing(p=1.0, scale=ERASE_SCALE, value=0))
    return T.Compose([*head, *op, *tail])


# -- set files ------------------------------------------------------------------------------------


@dataclass
class SetFile:
    """A parsed set file: ``paths`` [N] (absolute), ``set_of`` int64 [N] (0..S-1, in order of first
    appearance), ``class_of`` int64 [S] or None (labels sorted by name), ``set_names`` [S],
    ``classes`` (label names; empty without labels)."""

    path: str
    paths: list[str]
    set_of: np.ndarray
    class_of: Optional[np.ndarray]
    set_names: list[str]
    classes: list[str]


HEADER = ("path", "set_id", "label")


def _rows(path: str) -> list[tuple[int, list[str]]]:
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            lines = [(n, ln) for n, ln in enumerate(f, 1) if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as e:
        raise UserError(f"cannot read set file {path} ({e.strerror or e}); check --sets") from None
    rows = [(n, [c.strip() for c in row]) for (n, _), row in zip(lines, csv.reader(ln for _, ln in lines))]
    if rows and tuple(c.lower() for c in rows[0][1]) in (HEADER[:2], HEADER):
        rows = rows[1:]
    if not rows:
        raise UserError(f"set file {path} lists no images; write one path,set_id[,label] row per image")
    return rows


def _parse(path: str, rows: list[tuple[int, list[str]]]) -> tuple[list, list, list]:
    base = os.path.dirname(os.path.abspath(path))
    files, sets, labels = [], [], []
    for n, cols in rows:
        if len(cols) not in (2, 3) or not cols[0] or not cols[1]:
            raise UserError(
                f"set file {path} line {n}: expected path,set_id[,label] (2 or 3 non-empty columns), "
                f"got {len(cols)} column(s): {','.join(cols)!r}"
            )
        files.append((n, os.path.normpath(os.path.join(base, os.path.expanduser(cols[0])))))
        sets.append(cols[1])
        labels.append(cols[2] if len(cols) == 3 else None)
    has = [lab is not None and lab != "" for lab in labels]
    if any(has) and not all(has):
        n = rows[has.index(False)][0]
        raise UserError(f"set file {path} line {n}: no label, but other rows have one; label every row or none")
    return files, sets, labels if all(has) else []


def _groups(path: str, rows, sets: list[str], labels: list[str]) -> tuple[np.ndarray, Optional[np.ndarray], list]:
    names = list(dict.fromkeys(sets))
    pos = {s: i for i, s in enumerate(names)}
    set_of = np.array([pos[s] for s in sets], dtype=np.int64)
    size = np.bincount(set_of, minlength=len(names))
    if (size < 2).any():
        s = int(np.nonzero(size < 2)[0][0])
        n = rows[int(np.nonzero(set_of == s)[0][0])][0]
        raise UserError(
            f"set file {path} line {n}: set {names[s]!r} has one image; a set needs at least 2 "
            "(e.g. the views of one object): add its other images or remove the line"
        )
    if not labels:
        return set_of, None, []
    classes = sorted(set(labels))
    cpos = {c: i for i, c in enumerate(classes)}
    class_of = np.full(len(names), -1, dtype=np.int64)
    for (n, _), s, lab in zip(rows, set_of, labels):
        if class_of[s] not in (-1, cpos[lab]):
            raise UserError(
                f"set file {path} line {n}: set {names[s]!r} has the labels {classes[class_of[s]]!r} and {lab!r}; "
                "give all images of a set one label"
            )
        class_of[s] = cpos[lab]
    return set_of, class_of, classes


def unreadable(paths: list[str]) -> list[Optional[str]]:
    """For each image path: None when PIL decodes it, else the reason (a thread pool decodes)."""

    def check(p: str) -> Optional[str]:
        try:
            with open(p, "rb") as f:
                Image.open(f).convert("RGB")
            return None
        except FileNotFoundError:
            return "does not exist"
        except Exception as e:  # PIL raises many types on damaged files; this only decodes
            return f"cannot be read ({type(e).__name__}: {e})"

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(paths)))) as pool:
        return list(pool.map(check, paths))


def read_set_file(path: str) -> SetFile:
    """Parse and check a ``path,set_id[,label]`` set file (module docstring); every error is one
    line naming the file, the line and the fix."""
    rows = _rows(path)
    files, sets, labels = _parse(path, rows)
    set_of, class_of, classes = _groups(path, rows, sets, labels)
    for (n, p), why in zip(files, unreadable([p for _, p in files])):
        if why is not None:
            raise UserError(f"set file {path} line {n}: {p} {why}; fix the path or remove the line")
    return SetFile(path, [p for _, p in files], set_of, class_of, list(dict.fromkeys(sets)), classes)
