"""Write the CIFAR-10 sample that ships with the package (fewstep_lab/assets/cifar10-sample/).

Takes the first --train images (file-name order) of every class of the training split and the
first --test of every class of the test split of an ImageFolder copy of CIFAR-10 (by default
the project's JPEG re-encoded copy, ../shared/data/cifar10-jpeg), decodes them with Pillow as
fewstep_lab.data.images does, and writes them in CIFAR-10's official python format:
``cifar-10-batches-py/`` with ``data_batch_1`` (all training images), ``test_batch`` and
``batches.meta``, pickles of dicts with bytes keys, ``data`` as (N, 3072) uint8
(R, G, B planes of 32x32) and ``labels`` as a list. Classes are interleaved (one image of each
class in turn), so every prefix of 10 k images is class-balanced. ``filenames`` records where
each image came from. Deterministic: the same source gives byte-identical files. Pickle protocol 3:
the official files are Python 2 (protocol 2) pickles, which store bytes raw; Python 3's protocol 2
stores them as latin-1 text, half again as large, while protocol 3 stores them raw again. The same
readers (fewstep_lab's restricted unpickler, torchvision's loader) read both.

    python scripts/make_cifar10_sample.py                       # 40 train + 20 test per class, 1.86 MB
    python scripts/make_cifar10_sample.py --source DIR --out fewstep_lab/assets/cifar10-sample
"""

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SUFFIXES = {".jpg", ".jpeg", ".png"}


def take(source: Path, split: str, per_class: int):
    """(N, 3072) uint8, labels, file names: image i of every class, for i < per_class."""
    files = []
    for c, name in enumerate(CLASSES):
        found = sorted(p for p in (source / split / name).iterdir() if p.suffix.lower() in SUFFIXES)
        if len(found) < per_class:
            sys.exit(f"{source / split / name} has {len(found)} images, fewer than {per_class}")
        files.append(found[:per_class])
    data, labels, names = [], [], []
    for i in range(per_class):
        for c in range(len(CLASSES)):
            path = files[c][i]
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))
            if pixels.shape != (32, 32, 3):
                sys.exit(f"{path} is {pixels.shape[:2]}, not 32x32")
            data.append(pixels.transpose(2, 0, 1).reshape(-1))  # R, G, B planes, as the official files
            labels.append(c)
            names.append(f"{split}/{CLASSES[c]}/{path.name}".encode())
    return np.stack(data), labels, names


def write(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpeg")
    ap.add_argument("--out", type=Path, default=ROOT / "fewstep_lab" / "assets" / "cifar10-sample")
    ap.add_argument("--train", type=int, default=40, help="training images per class")
    ap.add_argument("--test", type=int, default=20, help="test images per class")
    a = ap.parse_args()
    folder = a.out / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class, name, label in (("train", a.train, "data_batch_1", "training batch 1 of 1"),
                                          ("test", a.test, "test_batch", "testing batch 1 of 1")):
        data, labels, names = take(a.source, split, per_class)
        write(folder / name, {b"batch_label": f"{label} (fewstep_lab sample)".encode(), b"labels": labels,
                              b"data": data, b"filenames": names})
    write(folder / "batches.meta", {b"num_cases_per_batch": a.train * len(CLASSES),
                                    b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072})
    total = sum(p.stat().st_size for p in folder.iterdir())
    print(f"wrote {folder}: {a.train} train + {a.test} test images per class, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
