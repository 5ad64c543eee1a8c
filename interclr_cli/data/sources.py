"""Where images come from: an index of file paths (and labels) built from ``data.root``.

``data.root`` is one of

- an ImageFolder tree ``ROOT/<class>/.../*.jpg``: labels from the class folders (sorted names);
- a folder of images, flat or nested: no labels (-1);
- a text file list: one path per line (relative paths are resolved against the list's folder),
  an optional last whitespace-separated integer column is the label, ``#`` starts a comment line;
- ``builtin:NAME[/SUBDIR]``: a data set shipped in the package (see :mod:`.builtin`).

With ``source=auto`` a file is a file list; a folder holding images at its top level is a plain
folder; a folder with a ``train/`` sub-folder (without images directly in it) beside ``val/`` or
``test/`` is a split root and its ``train/`` is indexed (so pretraining never sees the held-out
split); a folder whose immediate sub-folders hold images is an ImageFolder tree; anything else is
a nested plain folder.

Indexing never opens an image: it lists folders with ``os.scandir`` (a thread pool over the top
sub-folders), skips hidden names (a leading dot) and keeps files with an image extension. The
order is deterministic: classes sorted by name, paths sorted as strings (within each class).
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import UserError
from .builtin import PREFIX as BUILTIN_PREFIX
from .builtin import resolve_builtin

log = logging.getLogger("interclr.data")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SOURCES = ("auto", "imagefolder", "folder", "filelist")
_EXT_LIST = " ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
_THREADS = 16
_CACHE_FORMAT = "interclr-file-index"
_CACHE_VERSION = 1


@dataclass
class FileIndex:
    """The images of a data set, in a fixed order.

    ``root`` is the folder that was indexed (or the file list), ``paths`` absolute file paths,
    ``labels`` int64 [N] with -1 for unlabelled images, ``classes`` the class names (label i is
    ``classes[i]``; empty when unlabelled), ``source`` the kind that was indexed.
    """

    root: str
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    source: str = field(default="")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_labels(self) -> bool:
        """True when the index is non-empty and every image has a label."""
        return len(self.paths) > 0 and bool((self.labels >= 0).all())


# -- scanning -------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    i = name.rfind(".")
    return i > 0 and name[i:].lower() in IMAGE_EXTENSIONS


def _sorted_entries(d: str) -> list[os.DirEntry]:
    try:
        with os.scandir(d) as it:
            return sorted(it, key=attrgetter("name"))
    except OSError as e:
        log.warning("cannot list %s (%s); skipping it", d, e.strerror or e)
        return []


def _walk(d: str, out: list[str], seen: set[str]) -> None:
    """Append the image paths under ``d`` (recursive, unordered)."""
    exts = IMAGE_EXTENSIONS
    try:
        it = os.scandir(d)
    except OSError as e:
        log.warning("cannot list %s (%s); skipping it", d, e.strerror or e)
        return
    with it:
        for e in it:
            name = e.name
            if name[0] == ".":
                continue
            i = name.rfind(".")
            if i > 0 and name[i:].lower() in exts and not e.is_dir():
                out.append(e.path)
            elif e.is_dir():
                if e.is_symlink():  # guard against symlink loops
                    real = os.path.realpath(e.path)
                    if real in seen:
                        continue
                    seen.add(real)
                _walk(e.path, out, seen)


def _scan_tree(d: str) -> list[str]:
    """The image paths under ``d``, recursive, sorted as strings."""
    out: list[str] = []
    _walk(d, out, set())
    out.sort()
    return out


def _map_threads(fn, items: list) -> list:
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(_THREADS, len(items))) as ex:
        return list(ex.map(fn, items))


def _has_direct_images(d: str) -> bool:
    try:
        with os.scandir(d) as it:
            return any(e.name[0] != "." and _is_image(e.name) and not e.is_dir() for e in it)
    except OSError:
        return False


def _top_level(root: str) -> tuple[list[os.DirEntry], list[os.DirEntry]]:
    """(visible sub-folders, image files) directly in ``root``, sorted by name."""
    dirs, images = [], []
    for e in _sorted_entries(root):
        if e.name[0] == ".":
            continue
        if e.is_dir():
            dirs.append(e)
        elif _is_image(e.name):
            images.append(e)
    return dirs, images


def _scan_imagefolder(root: str) -> FileIndex:
    dirs, _ = _top_level(root)
    classes = [e.name for e in dirs]
    lists = _map_threads(_scan_tree, [e.path for e in dirs])
    for cls, lst in zip(classes, lists):
        if not lst:
            log.warning("class folder %s holds no images", os.path.join(root, cls))
    paths = [p for lst in lists for p in lst]
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(lst) for lst in lists])
    return FileIndex(root, paths, labels, classes, "imagefolder")


def _scan_folder(root: str) -> FileIndex:
    # Globally sorted paths, with the top sub-folders scanned in parallel: ordering the top
    # entries by "name/" (folders) or "name" (files) makes the concatenation sorted too.
    entries = [e for e in _sorted_entries(root) if e.name[0] != "."]
    units = sorted(
        (e.name + os.sep, e.path) if e.is_dir() else (e.name, e.path)
        for e in entries
        if e.is_dir() or _is_image(e.name)
    )
    subdirs = [p for k, p in units if k.endswith(os.sep)]
    sub_lists = iter(_map_threads(_scan_tree, subdirs))
    paths: list[str] = []
    for k, p in units:
        if k.endswith(os.sep):
            paths.extend(next(sub_lists))
        else:
            paths.append(p)
    return FileIndex(root, paths, np.full(len(paths), -1, dtype=np.int64), [], "folder")


def _detect(root: str) -> tuple[str, str]:
    """(kind, folder) for ``source=auto`` on a folder; kind is imagefolder, folder or split."""
    dirs, images = _top_level(root)
    if images:
        return "folder", root
    names = {e.name for e in dirs}
    if "train" in names and names & {"val", "test"}:
        train = os.path.join(root, "train")
        if not _has_direct_images(train):
            return "split", train
    if any(_has_direct_images(e.path) for e in dirs):
        return "imagefolder", root
    return "folder", root


def _check_missing(entries: list[tuple[int, str]], list_path: str) -> None:
    """Raise UserError on the first file-list entry that does not exist."""
    by_dir: dict[str, list[tuple[int, str]]] = {}
    for lineno, p in entries:
        by_dir.setdefault(os.path.dirname(p), []).append((lineno, p))

    def missing_in(item: tuple[str, list[tuple[int, str]]]) -> Optional[tuple[int, str]]:
        d, items = item
        if len(items) < 32:  # a few stats beat listing a possibly huge folder
            bad = [(n, p) for n, p in items if not os.path.exists(p)]
        else:
            try:
                with os.scandir(d) as it:
                    names = {e.name for e in it}
            except OSError:
                names = set()
            bad = [(n, p) for n, p in items if os.path.basename(p) not in names]
        return min(bad) if bad else None

    bad = [b for b in _map_threads(missing_in, list(by_dir.items())) if b is not None]
    if bad:
        lineno, p = min(bad)
        more = f" (and {len(bad) - 1} more folders with missing files)" if len(bad) > 1 else ""
        raise UserError(
            f"file list {list_path} line {lineno}: {p} does not exist{more}; fix the path or remove the line"
        )


def _read_filelist(list_path: str) -> FileIndex:
    base = os.path.dirname(list_path)
    entries: list[tuple[int, str]] = []
    labels: list[int] = []
    try:
        f = open(list_path, encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise UserError(f"cannot read file list {list_path} ({e.strerror or e}); check data.root") from None
    with f:
        for lineno, line in enumerate(f, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            label = -1
            parts = s.rsplit(None, 1)
            if len(parts) == 2:
                try:
                    label = int(parts[1])
                    s = parts[0]
                except ValueError:
                    pass
            if label < -1:
                raise UserError(
                    f"file list {list_path} line {lineno}: label {label} is negative; use 0..C-1 (or -1 for none)"
                )
            entries.append((lineno, os.path.normpath(os.path.join(base, s))))
            labels.append(label)
    if not entries:
        raise UserError(f"file list {list_path} lists no images; add one path per line or point data.root elsewhere")
    _check_missing(entries, list_path)
    lab = np.asarray(labels, dtype=np.int64)
    classes = [str(i) for i in range(int(lab.max()) + 1)] if (lab >= 0).any() else []
    return FileIndex(list_path, [p for _, p in entries], lab, classes, "filelist")


def _resolve_root(root: str) -> str:
    """An absolute path for ``root`` (``builtin:NAME[/SUB]`` resolved); UserError if missing."""
    if root.startswith(BUILTIN_PREFIX):
        name, _, sub = root[len(BUILTIN_PREFIX) :].partition("/")
        path = str(resolve_builtin(name) / sub) if sub else str(resolve_builtin(name))
    elif not root:
        raise UserError("data.root is empty; set data.root=PATH to an image folder, a file list or builtin:NAME")
    else:
        path = os.path.abspath(os.path.expanduser(root))
    if not os.path.exists(path):
        raise UserError(
            f"data root {path} does not exist; set data.root=PATH to an image folder, a file list or builtin:NAME"
        )
    return path


def _scan(path: str, source: str) -> FileIndex:
    is_file = os.path.isfile(path)
    if source == "auto":
        if is_file:
            source = "filelist"
        else:
            kind, folder = _detect(path)
            if kind == "split":
                log.info("%s holds train/ and val|test/ splits; indexing %s", path, folder)
                return _scan(folder, "auto")
            source = kind
    if source == "filelist":
        if not is_file:
            raise UserError(f"data root {path} is a folder, not a file list; set data.source=auto or folder")
        return _read_filelist(path)
    if is_file:
        raise UserError(f"data root {path} is a file; set data.source=filelist (or auto) to read it as a file list")
    index = _scan_imagefolder(path) if source == "imagefolder" else _scan_folder(path)
    if not index.paths:
        raise UserError(
            f"data root {path} holds no images ({_EXT_LIST}); point data.root at a folder of images, "
            "an ImageFolder tree or a file list"
        )
    return index


def index_source(root: str, source: str = "auto", cache_path: Union[Path, str, None] = None) -> FileIndex:
    """Index the images of ``root`` (see the module docstring for ``source`` kinds).

    With ``cache_path``: if that file exists and was written for the same root and source it is
    loaded without listing any folder; otherwise the root is scanned and the index written there
    atomically, so a resumed run sees exactly the same order.
    """
    if source not in SOURCES:
        raise UserError(
            f"unknown data source {source!r}; set data.source to one of {', '.join(SOURCES)} "
            "(built-in data sets go in data.root=builtin:NAME)"
        )
    path = _resolve_root(root)
    key = {"root": path, "source": source}
    if cache_path is not None:
        cached = _load_cache(Path(cache_path), key)
        if cached is not None:
            return cached
    t0 = time.perf_counter()
    index = _scan(path, source)
    log.info("indexed %d images in %s (%s) in %.2fs", len(index), index.root, index.source, time.perf_counter() - t0)
    if cache_path is not None:
        _write_cache(Path(cache_path), key, index)
    return index


# -- the index cache --------------------------------------------------------------------------------
# Line 1: a JSON header (root, source, classes, labels run-length encoded); then one path per line,
# relative to the indexed root when every path lies under it.


def _write_cache(path: Path, key: dict, index: FileIndex) -> None:
    n = len(index.paths)
    body = "\n".join(index.paths)  # whole-string operations: far faster than a loop per path
    if body.count("\n") != max(n - 1, 0) or "\r" in body:
        log.warning("a file name holds a line break; not writing the index cache %s", path)
        return
    prefix = index.root.rstrip(os.sep) + os.sep
    # Every line starts with the prefix iff the first does and "\n" + prefix occurs n - 1 times.
    relative = n > 0 and body.startswith(prefix) and body.count("\n" + prefix) == n - 1
    if relative:
        body = body[len(prefix) :].replace("\n" + prefix, "\n")
    labels = np.asarray(index.labels, dtype=np.int64)
    if len(labels):
        starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
        counts = np.diff(np.r_[starts, len(labels)])
        rle = np.stack([labels[starts], counts], 1).tolist()
    else:
        rle = []
    header = {
        "format": _CACHE_FORMAT,
        "version": _CACHE_VERSION,
        **key,
        "index_root": index.root,
        "kind": index.source,
        "classes": index.classes,
        "count": len(index.paths),
        "relative": relative,
        "labels_rle": rle,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        f.write(json.dumps(header, ensure_ascii=False))
        f.write("\n")
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_cache(path: Path, key: dict) -> Optional[FileIndex]:
    """The cached index, or None if absent, stale (other root/source) or unreadable."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            header = json.loads(f.readline())
            body = f.read()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("index cache %s is unreadable (%s); rescanning", path, e)
        return None
    if not isinstance(header, dict) or header.get("format") != _CACHE_FORMAT or header.get("version") != _CACHE_VERSION:
        log.warning("index cache %s has an unknown format; rescanning", path)
        return None
    if header.get("root") != key["root"] or header.get("source") != key["source"]:
        log.info("index cache %s was written for another root or source; rescanning", path)
        return None
    count = header["count"]
    lines = body.split("\n") if count else []
    rle = header["labels_rle"]
    if len(lines) != count or sum(c for _, c in rle) != count:
        log.warning("index cache %s is truncated; rescanning", path)
        return None
    if header["relative"]:
        prefix = header["index_root"].rstrip(os.sep) + os.sep
        paths = [prefix + p for p in lines]
    else:
        paths = lines
    if rle:
        vals, counts = zip(*rle)
        labels = np.repeat(np.asarray(vals, dtype=np.int64), np.asarray(counts, dtype=np.int64))
    else:
        labels = np.zeros(0, dtype=np.int64)
    return FileIndex(header["index_root"], paths, labels, list(header["classes"]), header["kind"])


# -- evaluation splits ------------------------------------------------------------------------------


def resolve_eval_split(data_cfg, split: str, cache_path: Union[Path, str, None] = None) -> FileIndex:
    """The labelled index of an evaluation split.

    ``train``: ``data.train`` if set, else ``<root>/train``. ``val``: ``data.val`` if set, else
    ``<root>/val``, else ``<root>/test``. Folders are read as ImageFolder trees, files as file
    lists; an unlabelled split is a UserError.
    """
    if split not in ("train", "val"):
        raise UserError(f"unknown evaluation split {split!r}; use train or val")
    explicit = data_cfg.train if split == "train" else data_cfg.val
    if explicit:
        spec = _resolve_root(explicit)
        hint = f"data.{split}"
    else:
        base = _resolve_root(data_cfg.root)
        if os.path.isfile(base):
            raise UserError(
                f"data.root {base} is a file list, which has no {split} split; set data.train=PATH and data.val=PATH"
            )
        names = ["train"] if split == "train" else ["val", "test"]
        found = [os.path.join(base, n) for n in names if os.path.isdir(os.path.join(base, n))]
        if not found:
            tried = " nor ".join(os.path.join(base, n) for n in names)
            which = "neither " + tried if len(names) > 1 else tried
            raise UserError(
                f"no {split} split: {which} exists; set data.{split}=PATH (a labelled ImageFolder tree or file list)"
            )
        spec = found[0]
        hint = f"data.{split}"
    source = "filelist" if os.path.isfile(spec) else "imagefolder"
    index = index_source(spec, source, cache_path=cache_path)
    if not index.has_labels:
        raise UserError(
            f"evaluation split {spec} has unlabelled images; set {hint}=PATH to an ImageFolder tree "
            "(one sub-folder per class) or a file list with a label column"
        )
    return index
