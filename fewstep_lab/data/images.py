"""CIFAR-10 (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images") as tensors.

Two on-disk layouts are read: the official python release (a folder ``cifar-10-batches-py``
with ``data_batch_1..5`` and ``test_batch``, what torchvision's ``CIFAR10(download=True)``
leaves) and an ImageFolder tree (``train/<class>/*.jpg|png``, ``test/<class>/*``) such as the
read-only JPEG copy in ``../shared/data/cifar10-jpeg`` (re-encoded at quality 75, so metrics
on it are for comparisons inside this course only). Images are decoded once and cached as
``.safetensors`` outside the data folder. Labels follow CIFAR-10's order, which is the
alphabetical order of the class names. Models see pixels mapped to [-1, 1] (DDPM, Ho et al.
2020, Sec. 3.3), with random horizontal flips as the only augmentation (DDPM, Appendix B).

Decoding cost, measured on a shared 2-core machine (PIL, one thread; two threads were no
faster there): 0.1-0.4 ms per 32x32 JPEG; the 50,000 training images took 20 s, once, and the
cached file (154 MB) then loads in milliseconds. With ``limit`` only the selected files are
decoded (``limit=1000``: 0.8 s), or they are taken from a full cache when one exists.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CLASSES", "find_cifar10", "load_cifar10", "download_cifar10",
    "to_model_range", "from_model_range", "random_batch",
]

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
PY_FOLDER = "cifar-10-batches-py"
PY_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder above the package


# ----------------------------------------------------------------------------- locating

def _python_format(path: Path) -> Path | None:
    """The ``cifar-10-batches-py`` folder at or directly under ``path``, if complete."""
    for folder in (path, path / PY_FOLDER):
        if all((folder / f).is_file() for files in PY_FILES.values() for f in files):
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
    """Locate CIFAR-10: ``root``, else env FEWSTEP_DATA, else the default places (see module doc).

    An explicit ``root`` (or FEWSTEP_DATA) is the only place looked at: a wrong path is an
    error rather than a silent fall-back to another copy. Returns the ``cifar-10-batches-py``
    folder or the ImageFolder root, resolved.
    """
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
    raise FileNotFoundError(
        f"CIFAR-10 not found; looked in {origin}:\n{looked}\n"
        f"Expected either a '{PY_FOLDER}' folder (data_batch_1..5, test_batch) or a folder "
        "with train/<class>/ and test/<class>/ images. To fix: set FEWSTEP_DATA=/path/to/it, "
        "pass --data /path/to/it (root=...), or with internet run "
        "fewstep_lab.data.images.download_cifar10('data') once."
    )


# ----------------------------------------------------------------------------- reading

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


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One official batch file -> (N, 3, 32, 32) uint8 and (N,) int64 labels."""
    with open(path, "rb") as f:
        batch = _RestrictedUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch file (no dict inside)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(batch["labels"], dtype=np.int64)


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
        with Image.open(files[j]) as im:
            pixels = np.asarray(im.convert("RGB"))
        if pixels.shape != (32, 32, 3):
            raise ValueError(f"{files[j]} is {pixels.shape[:2]}, CIFAR-10 images are 32x32")
        images[i] = pixels
    return images.transpose(0, 3, 1, 2), labels[idx]


def _decode(source: Path, split: str, limit: int | None):
    if (source / PY_FILES[split][0]).is_file():
        parts = [_read_batch(source / f) for f in PY_FILES[split]]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        idx = _select(labels, limit)
        return images[idx], labels[idx]
    return _decode_folder(source, split, limit)


def _cache_file(cache_dir: Path, source: Path, split: str, limit: int | None) -> Path:
    key = hashlib.sha1(f"{source}|{split}".encode()).hexdigest()[:16]
    return cache_dir / f"cifar10-{split}-{'all' if limit is None else limit}-{key}.safetensors"


def _save(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({"images": images.contiguous(), "labels": labels.contiguous()}, str(tmp))
    os.replace(tmp, path)  # atomic: parallel test workers never see half a file


def _load(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return tensors["images"], tensors["labels"]


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
    holds the split, the limit and a hash of the source path.
    """
    if split not in PY_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    source = find_cifar10(root)
    cache_dir = resolve_cache_dir(cache_dir, source)

    cached = _cache_file(cache_dir, source, split, limit)
    if cached.is_file():
        return _load(cached)
    full = _cache_file(cache_dir, source, split, None)
    if limit is not None and full.is_file():  # subset of an existing full cache: no decoding
        images, labels = _load(full)
        idx = torch.from_numpy(_select(labels.numpy(), limit))
        return images[idx].contiguous(), labels[idx].contiguous()
    images, labels = _decode(source, split, limit)
    images = torch.from_numpy(np.ascontiguousarray(images))
    labels = torch.from_numpy(np.ascontiguousarray(labels))
    _save(cached, images, labels)
    return images, labels


def download_cifar10(root: str | os.PathLike) -> Path:
    """Download the official python release into ``root``, check its MD5 and extract it.

    Needs internet, so it is not run by the tests (the machines that run them have none).
    Returns ``root/cifar-10-batches-py``; afterwards ``find_cifar10(root)`` finds it.
    """
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    if not archive.is_file():
        tmp = archive.with_suffix(".part")
        urllib.request.urlretrieve(URL, tmp)
        os.replace(tmp, archive)
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    if digest != MD5:
        raise OSError(f"{archive} has MD5 {digest}, expected {MD5}; delete it and retry")
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():  # refuse links and paths that leave root
            target = (root / member.name).resolve()
            if not (member.isfile() or member.isdir()) or root.resolve() not in target.parents:
                raise OSError(f"unexpected member {member.name!r} in {archive}")
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(root, **safe)
    return root / PY_FOLDER


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
