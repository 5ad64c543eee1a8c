"""Build the shipped ``builtin:cifar10-mini`` data set from a CIFAR-10 ImageFolder tree.

Copies a fixed subset byte for byte (no re-encoding): for each class, the first ``--train`` files
by sorted name of ``train/<class>/`` and the first ``--test`` files of ``test/<class>/``, into
``interclr_cli/builtin/cifar10-mini/{train,test}/<class>/``, and writes a README.md there that
says where the images come from. Running it twice gives the same files.

    python tools/make_builtin.py [--src ../shared/data/cifar10] [--train 500] [--test 100]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SRC = REPO.parent / "shared" / "data" / "cifar10"
DEFAULT_OUT = REPO / "interclr_cli" / "builtin" / "cifar10-mini"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

README = """\
# cifar10-mini

A small, fixed subset of CIFAR-10 shipped with interclr so that `data.root=builtin:cifar10-mini`
works in a fresh clone, for demos, smoke tests and CI.

- Source: CIFAR-10 (Alex Krizhevsky, "Learning Multiple Layers of Features from Tiny Images",
  2009), 32x32 colour images in 10 classes, as baseline JPEG files re-encoded from the original
  pixels (slightly lossy).
- `train/<class>/`: the first {train} files by sorted file name of each class of the standard
  CIFAR-10 training split ({train_total} images).
- `test/<class>/`: the first {test} files by sorted file name of each class of the standard
  CIFAR-10 test split ({test_total} images).
- Classes: {classes}.
- File names are kept from the source tree; the bytes are copied unchanged.

Rebuild with `python tools/make_builtin.py` (see its --help).
"""


def copy_split(src: Path, out: Path, per_class: int) -> int:
    """Copy the first ``per_class`` files (sorted by name) of each class; return the count."""
    if out.exists():
        shutil.rmtree(out)
    total = 0
    for cls in CLASSES:
        files = sorted(p for p in (src / cls).iterdir() if p.suffix.lower() == ".jpg")
        if len(files) < per_class:
            sys.exit(f"{src / cls} has {len(files)} images, fewer than {per_class}")
        (out / cls).mkdir(parents=True)
        for p in files[:per_class]:
            shutil.copyfile(p, out / cls / p.name)
        total += per_class
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC, help="CIFAR-10 ImageFolder root with train/ and test/")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--train", type=int, default=500, help="images per class from train/")
    ap.add_argument("--test", type=int, default=100, help="images per class from test/")
    args = ap.parse_args()
    if not (args.src / "train").is_dir() or not (args.src / "test").is_dir():
        sys.exit(f"{args.src} has no train/ and test/ folders; pass --src PATH")
    n_train = copy_split(args.src / "train", args.out / "train", args.train)
    n_test = copy_split(args.src / "test", args.out / "test", args.test)
    (args.out / "README.md").write_text(
        README.format(
            train=args.train, test=args.test, train_total=n_train, test_total=n_test, classes=", ".join(CLASSES)
        )
    )
    print(f"wrote {n_train} train and {n_test} test images to {args.out}")


if __name__ == "__main__":
    main()
