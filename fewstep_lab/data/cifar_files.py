"""Reading CIFAR-10's two on-disk formats safely (used by images.py).

The official python release pickles dicts of numpy arrays; they are read through a restricted
unpickler that resolves only the globals such a file needs, so a crafted file cannot run code.
ImageFolder trees are decoded with Pillow. A damaged file (truncated, not a CIFAR-10 file, an
unreadable image) raises ValueError naming it. ``_fingerprint`` summarises a split's files
(count, total size, newest mtime) for the decoded-image cache key. No paper: this is plumbing.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
PY_FOLDER = "cifar-10-batches-py"
PY_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals an official CIFAR-10 batch file needs."""

    _reconstruct = np.zeros(0).__reduce__()[0]  # numpy's ndarray rebuilder, any numpy version
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes as _codecs.encode(str, 'latin1') at protocol 2.
        ("_codecs", "encode"): lambda text, encoding="utf-8": _latin1(text, encoding),
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': a CIFAR-10 batch file only "
                "holds numpy arrays, lists and strings; this file is not one"
            ) from None


def _latin1(text: str, encoding: str) -> bytes:
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _damaged(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is damaged or not a CIFAR-10 file ({why}); delete the dataset folder and "
                      "get it again (fewstep data cifar10 --download), or point FEWSTEP_DATA at a good copy")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One official batch file -> (N, 3, 32, 32) uint8 and (N,) int64 labels."""
    try:
        with open(path, "rb") as f:
            batch = _RestrictedUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as err:
        if "refusing" in str(err):
            raise
        raise _damaged(path, f"{type(err).__name__}: {err}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as err:
        raise _damaged(path, f"{type(err).__name__}: {err}" if str(err) else "truncated") from None
    if not isinstance(batch, dict):
        raise _damaged(path, "no dict inside")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise _damaged(path, f"no 'data' and 'labels' entries (has {sorted(map(str, batch))})")
    try:
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch["labels"], dtype=np.int64).reshape(-1)
    except (ValueError, TypeError) as err:
        raise _damaged(path, f"entries of the wrong shape: {err}") from None
    if len(data) != len(labels) or (labels.size and not 0 <= labels.min() <= labels.max() < len(CLASSES)):
        raise _damaged(path, f"{len(data)} images but {len(labels)} labels, or labels outside 0..9")
    return data, labels


def _select(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of a class-balanced subset: the first ``limit/10`` of each class, in order."""
    if limit is None:
        return np.arange(len(labels))
    if not 0 < limit <= len(labels):
        raise ValueError(f"limit must be in 1..{len(labels)}, got {limit}")
    keep = []
    for c in range(len(CLASSES)):
        want = limit // len(CLASSES) + (c < limit % len(CLASSES))  # remainder to first classes
        have = np.flatnonzero(labels == c)
        if len(have) < want:
            raise ValueError(f"class {CLASSES[c]} has only {len(have)} images, need {want}")
        keep.append(have[:want])
    return np.sort(np.concatenate(keep))


def _decode_folder(root: Path, split: str, limit: int | None):
    """Decode an ImageFolder split with PIL (only the selected files when ``limit`` is set)."""
    from PIL import Image

    split_dir = root / split
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if tuple(names) != CLASSES:
        raise ValueError(f"{split_dir} should hold the 10 CIFAR-10 class folders {CLASSES}, "
                         f"found {names}")
    files, labels = [], []
    for c, name in enumerate(names):
        found = sorted(p for p in (split_dir / name).iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [c] * len(found)
    labels = np.asarray(labels, dtype=np.int64)
    idx = _select(labels, limit)
    images = np.empty((len(idx), 32, 32, 3), dtype=np.uint8)
    for i, j in enumerate(idx):
        try:
            with Image.open(files[j]) as im:
                pixels = np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:  # PIL: unidentified, truncated or broken files
            raise _damaged(files[j], f"{type(err).__name__}: {err}") from None
        if pixels.shape != (32, 32, 3):
            raise ValueError(f"{files[j]} is {pixels.shape[:2]}, CIFAR-10 images are 32x32")
        images[i] = pixels
    return images.transpose(0, 3, 1, 2), labels[idx]


def _decode(source: Path, split: str, limit: int | None):
    if (source / PY_FILES[split][0]).is_file():
        parts = [_read_batch(source / f) for f in PY_FILES[split] if (source / f).is_file()]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        idx = _select(labels, limit)
        return images[idx], labels[idx]
    return _decode_folder(source, split, limit)


def _fingerprint(source: Path, split: str) -> str:
    """(file count, total bytes, newest mtime) of a split's files: changes when the source changes."""
    if (source / PY_FILES[split][0]).is_file():
        stats = [(source / f).stat() for f in PY_FILES[split] if (source / f).is_file()]
    else:
        stats, stack = [], [source / split]
        while stack:  # os.scandir: 50,000 files in about 0.25 s
            with os.scandir(stack.pop()) as entries:
                for e in entries:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    else:
                        stats.append(e.stat())
    return f"{len(stats)}|{sum(s.st_size for s in stats)}|{max((s.st_mtime_ns for s in stats), default=0)}"
