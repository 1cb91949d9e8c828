"""CIFAR-10 (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images") as tensors.

Two on-disk layouts are read: the official python release (a folder ``cifar-10-batches-py``
with ``data_batch_1..5`` and ``test_batch``, what torchvision's ``CIFAR10(download=True)``
leaves) and an ImageFolder tree (``train/<class>/*.jpg|png``, ``test/<class>/*``) such as the
read-only JPEG copy in ``../shared/data/cifar10-jpeg`` (re-encoded at quality 75, so metrics
on it are for comparisons inside this course only). The root ``"sample"`` is the sample shipped
with the package (``CIFAR10_SAMPLE``: 40 training and 20 test images per class, official format;
see data/README.md). Images are decoded once and cached as ``.safetensors`` outside the data
folder, keyed by the source and a fingerprint of its files (count, total size, newest mtime), so
a changed source is decoded again. When nothing is found and downloads are allowed
(download.auto_download_allowed), ``load_cifar10`` fetches the official copy once (download.py).
Labels follow CIFAR-10's order, which is the alphabetical order of the class names. Models see pixels mapped to [-1, 1] (DDPM, Ho et al.
2020, Sec. 3.3), with random horizontal flips as the only augmentation (DDPM, Appendix B).

Decoding cost, measured on a shared 2-core machine (PIL, one thread; two threads were no
faster there): 0.1-0.4 ms per 32x32 JPEG; the 50,000 training images took 20 s, once, and the
cached file (154 MB) then loads in milliseconds. With ``limit`` only the selected files are
decoded (``limit=1000``: 0.8 s), or they are taken from a full cache when one exists.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

# Re-exported: the names this module had before the split into cifar_files.py and download.py.
from .cifar_files import (CLASSES, IMAGE_SUFFIXES, PY_FILES, PY_FOLDER, _decode, _fingerprint,  # noqa: F401
                          _read_batch, _RestrictedUnpickler, _select)
from .download import (MD5, URL, DataUnavailableError, auto_download_allowed, default_download_root,  # noqa: F401
                       download_cifar10)

__all__ = [
    "CLASSES", "CIFAR10_SAMPLE", "SAMPLE_ROOT", "DataUnavailableError", "find_cifar10", "load_cifar10",
    "download_cifar10", "to_model_range", "from_model_range", "random_batch",
]

REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder above the package
# The sample that ships with the package: find_cifar10("sample") / load_cifar10("sample", split).
SAMPLE_ROOT = "sample"
CIFAR10_SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "cifar10-sample"


# ----------------------------------------------------------------------------- locating

def _python_format(path: Path, complete: bool = True) -> Path | None:
    """The ``cifar-10-batches-py`` folder at or directly under ``path``: all batches, or (the sample) the first of each split."""
    for folder in (path, path / PY_FOLDER):
        if all((folder / files[0]).is_file() and (not complete or all((folder / f).is_file() for f in files))
               for files in PY_FILES.values()):
            return folder
    return None


def _image_folder(path: Path) -> Path | None:
    """``path`` itself when it holds ``train/`` and ``test/`` class folders."""
    if all((path / split).is_dir() and any((path / split).iterdir())
           for split in ("train", "test")):
        return path
    return None


def _recognise(path: Path) -> Path | None:
    return _python_format(path) or _image_folder(path)


def _default_places() -> list[Path]:
    places = []
    for base in (Path.cwd(), REPO_ROOT):
        for rel in ("data/cifar10", f"data/{PY_FOLDER}", "../shared/data/cifar10-jpeg"):
            place = (base / rel).resolve()
            if place not in places:
                places.append(place)
    return places


def find_cifar10(root: str | os.PathLike | None = None) -> Path:
    """Locate CIFAR-10: ``root`` ("sample": the shipped sample), else env FEWSTEP_DATA, else the default places.

    An explicit ``root`` (or FEWSTEP_DATA) is the only place looked at: a wrong path is an
    error rather than a silent fall-back to another copy. Returns the ``cifar-10-batches-py``
    folder or the ImageFolder root, resolved. Raises DataUnavailableError (a FileNotFoundError)
    naming the places searched and the ways to get the data.
    """
    if isinstance(root, str) and root == SAMPLE_ROOT:
        found = _python_format(CIFAR10_SAMPLE, complete=False)
        if found is None:
            raise DataUnavailableError("the CIFAR-10 sample is missing from the installed package "
                                       f"({CIFAR10_SAMPLE}); reinstall fewstep_lab (pip install -e .)")
        return found
    if root is not None:
        places, origin = [Path(root).expanduser().resolve()], "the root argument"
    elif os.environ.get("FEWSTEP_DATA"):
        places = [Path(os.environ["FEWSTEP_DATA"]).expanduser().resolve()]
        origin = "the FEWSTEP_DATA environment variable"
    else:
        places, origin = _default_places(), "the default places"
    for place in places:
        found = _recognise(place)
        if found is not None:
            return found
    looked = "\n".join(f"  {p}" for p in places)
    raise DataUnavailableError(
        f"CIFAR-10 not found; looked in {origin}:\n{looked}\n"
        f"Expected either a '{PY_FOLDER}' folder (data_batch_1..5, test_batch) or a folder "
        "with train/<class>/ and test/<class>/ images. To fix: run `fewstep data cifar10 --download` "
        "(into ./data/cifar10; --root DIR for another folder), or download "
        f"{URL} by hand and unpack it into ./data/cifar10, or set FEWSTEP_DATA=/path/to/it "
        "(or pass root=...; root='sample' is the small sample shipped with the package)."
    )


def _cache_file(cache_dir: Path, source: Path, split: str, limit: int | None) -> Path:
    key = hashlib.sha1(f"{source}|{split}|{_fingerprint(source, split)}".encode()).hexdigest()[:16]
    return cache_dir / f"cifar10-{split}-{'all' if limit is None else limit}-{key}.safetensors"


def _save(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    from safetensors.torch import save

    from ..io import atomic_write_bytes

    # atomic: parallel test workers never see half a file, a full disk leaves no partial one
    atomic_write_bytes(path, save({"images": images.contiguous(), "labels": labels.contiguous()}))


def _load(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached tensors, or None (and the file removed) when the cache file is damaged."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        return tensors["images"], tensors["labels"]
    except Exception:  # a damaged cache is only a cache: decode again
        path.unlink(missing_ok=True)
        return None


def resolve_cache_dir(cache_dir, source: Path) -> Path:
    """The cache folder: `cache_dir`, else env FEWSTEP_CACHE, else ~/.cache/fewstep_lab; never inside `source`."""
    if cache_dir is None:
        cache_dir = os.environ.get("FEWSTEP_CACHE") or Path.home() / ".cache" / "fewstep_lab"
    cache_dir = Path(cache_dir).expanduser().resolve()
    if cache_dir == source or source in cache_dir.parents:
        raise ValueError(f"cache_dir {cache_dir} is inside the data folder {source}, "
                         "which may be read-only; choose another cache_dir / FEWSTEP_CACHE")
    return cache_dir


def load_cifar10(root: str | os.PathLike | None = None, split: str = "train", *,
                 cache_dir: str | os.PathLike | None = None,
                 limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 split as (N, 3, 32, 32) uint8 images and (N,) int64 labels, decoded once and cached.

    ``limit`` keeps the first ``limit // 10`` images of every class (the remainder going to
    the first classes), in dataset order: deterministic and class-balanced. The cache lives
    in ``cache_dir``, else env FEWSTEP_CACHE, else ``~/.cache/fewstep_lab``; its file name
    holds the split, the limit and a hash of the source path and of its files' fingerprint.
    """
    if split not in PY_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    source = _find_or_download(root)
    cache_dir = resolve_cache_dir(cache_dir, source)

    cached = _cache_file(cache_dir, source, split, limit)
    loaded = _load(cached) if cached.is_file() else None
    if loaded is not None:
        return loaded
    full = _cache_file(cache_dir, source, split, None)
    loaded = _load(full) if limit is not None and full.is_file() else None
    if loaded is not None:  # subset of an existing full cache: no decoding
        images, labels = loaded
        idx = torch.from_numpy(_select(labels.numpy(), limit))
        return images[idx].contiguous(), labels[idx].contiguous()
    images, labels = _decode(source, split, limit)
    images = torch.from_numpy(np.ascontiguousarray(images))
    labels = torch.from_numpy(np.ascontiguousarray(labels))
    _save(cached, images, labels)
    return images, labels


_download_tried = False  # one automatic attempt per process: a failed one is not repeated at every call


def _find_or_download(root) -> Path:
    """find_cifar10(root); when nothing is found at the default places, download once if allowed."""
    global _download_tried
    try:
        return find_cifar10(root)
    except DataUnavailableError as missing:
        allowed, why = auto_download_allowed()
        if root is not None or _download_tried or not allowed:
            if root is None and not allowed:
                raise DataUnavailableError(f"{missing}\n(Not downloaded automatically: {why}.)") from None
            raise
        _download_tried = True
        target = default_download_root()
        print(f"CIFAR-10 not found; downloading it once into {target} (about 170 MB; "
              f"set FEWSTEP_NO_DOWNLOAD=1 to never do this)", flush=True)
        download_cifar10(target)
        return find_cifar10(target)


# ----------------------------------------------------------------------------- batches

def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> float32 in [-1, 1] (DDPM, Ho et al. 2020, Sec. 3.3)."""
    return images.to(torch.float32) / 127.5 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 pixels, rounded and clipped; inverse of ``to_model_range``."""
    return ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def random_batch(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 generator: torch.Generator, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform draw with replacement, mapped to [-1, 1], each image mirrored left-right with p = 1/2.

    Returns ``(x, labels)`` of shapes (B, 3, H, W) float32 and (B,) int64; every random
    choice comes from ``generator`` (same seed, same batch). Tensors stay on their device.
    """
    device = generator.device
    idx = torch.randint(len(images), (batch_size,), generator=generator, device=device)
    idx = idx.to(images.device)
    x = to_model_range(images[idx])
    if flip:
        mirror = torch.rand(batch_size, generator=generator, device=device) < 0.5
        x = torch.where(mirror.to(x.device)[:, None, None, None], x.flip(-1), x)
    return x, labels[idx.to(labels.device)].long()
