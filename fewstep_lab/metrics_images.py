"""Image sample quality: "FD" on the course's CIFAR-10 classifier, and real FID when weights exist.

The Fréchet distance between two Gaussians (Dowson & Landau 1982; the 2-Wasserstein distance
between them) is ``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)``. FID (Heusel et al.
2017, Sec. 3) evaluates it on Gaussians fitted to Inception-v3 pool features. These machines
cannot download Inception, so the course evaluates the same formula on the 128-d pooled
features of a small CIFAR-10 classifier that it trains and ships
(fewstep_lab/nets/classifier.py, fewstep_lab/assets/cifar10_classifier.*) and calls the result
**FD**, never FID: its numbers are comparable with each other, not with published FIDs.
Like FID, FD is biased upwards at small sample sizes; always quote it next to its floor (two
disjoint real samples of the same size) and compare methods at equal sample sizes.
``fid`` computes real FID through torch-fidelity, only from an Inception weights file the
user names in FEWSTEP_INCEPTION_WEIGHTS: nothing is downloaded.

Measured with the shipped classifier (75.3% test accuracy) against ``cifar10_stats('train')``
(50,000 images; 134 s to compute once on a busy 2-core CPU, then read from the cache): the
real-data floor is FD 0.08-0.10 for 1,000 test images, 0.016-0.020 for 5,000 and 0.010 for
all 10,000 (1,000 or 5,000 *train* images give the same, so the network's training set is
not favoured); two disjoint real sets of equal size differ by 0.28-0.35 (500 each), 0.16-0.19
(1,000) and 0.03-0.04 (5,000). For scale, 5,000 test images blurred by a 3x3 box filter give
5.1, with Gaussian noise of std 0.2 (in [-1, 1] units) 4.0, uniform noise 23.7.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .data.images import find_cifar10, from_model_range, load_cifar10, resolve_cache_dir, to_model_range
from .nets.classifier import CifarClassifier

__all__ = ["CLASSIFIER_WEIGHTS", "classifier_info", "load_fd_classifier", "frechet_distance",
           "feature_stats", "cifar10_stats", "fd", "fid", "classifier_accuracy"]

CLASSIFIER_WEIGHTS = Path(__file__).resolve().parent / "assets" / "cifar10_classifier.safetensors"
INCEPTION_ENV = "FEWSTEP_INCEPTION_WEIGHTS"


# ----------------------------------------------------------------------------- classifier

def _weights_path(path) -> Path:
    path = Path(path).expanduser() if path is not None else CLASSIFIER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"FD classifier weights not found at {path}. They ship with the package "
            "(fewstep_lab/assets/); reinstall it, or retrain them with "
            "`python scripts/train_fd_classifier.py --epochs 2.5 --threads 2` (10-30 min on 2 CPU cores).")
    return path


def classifier_info(path=None) -> dict:
    """The JSON record written next to the classifier weights (kwargs, test accuracy, command, ...)."""
    info = _weights_path(path).with_suffix(".json")
    if not info.is_file():
        raise FileNotFoundError(f"{info} is missing; it records how to build the network. "
                                "Retrain with `python scripts/train_fd_classifier.py`.")
    return json.loads(info.read_text())


def load_fd_classifier(path=None, device="cpu") -> CifarClassifier:
    """The shipped (or given) CIFAR-10 classifier, read with safetensors, in eval mode, frozen."""
    from safetensors.torch import load_file  # safetensors holds tensors only: nothing is unpickled

    path = _weights_path(path)
    model = CifarClassifier(**classifier_info(path)["kwargs"])
    model.load_state_dict(load_file(str(path)))
    model.requires_grad_(False)
    return model.eval().to(device)


# ----------------------------------------------------------------------------- the distance

def _as_numpy(a, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _clip_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with rounding noise removed: those below the noise floor become 0.

    ``eigh`` returns a zero eigenvalue as about +-d * eps * max|w| (float64: ~1e-15 relative), and the
    square root turns that into ~3e-8, an error far above float64 precision. Values under that floor
    (the threshold of ``numpy.linalg.matrix_rank``) cannot be told from 0, so they are set to 0.
    """
    floor = w.shape[0] * np.finfo(w.dtype).eps * max(float(np.abs(w).max(initial=0.0)), 0.0)
    return np.where(w > floor, w, 0.0)


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix by eigen-decomposition (rounding noise clipped to 0)."""
    c = (c + c.T) / 2
    w, v = np.linalg.eigh(c)
    root = (v * np.sqrt(_clip_eigenvalues(w))) @ v.T
    return (root + root.T) / 2


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet (2-Wasserstein^2) distance between N(mu1, cov1) and N(mu2, cov2) (Dowson & Landau 1982).

    The cross term tr((C1 C2)^1/2) equals tr((S C2 S)^1/2) with S = C1^1/2: S C2 S is symmetric
    PSD, so both roots come from ``eigh`` and stay real, unlike a general ``sqrtm(C1 @ C2)``,
    which goes complex or loses accuracy when the covariances are (near) singular.
    """
    mu1, mu2 = _as_numpy(mu1, "mu1"), _as_numpy(mu2, "mu2")
    cov1, cov2 = _as_numpy(cov1, "cov1"), _as_numpy(cov2, "cov2")
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"need mu1, mu2 of shape (d,) and cov1, cov2 of shape (d, d); got "
                         f"{mu1.shape}, {cov1.shape}, {mu2.shape}, {cov2.shape}")
    cov1, cov2 = (cov1 + cov1.T) / 2, (cov2 + cov2.T) / 2  # remove asymmetric rounding
    s1 = _psd_sqrt(cov1)
    m = s1 @ cov2 @ s1
    cross = np.sqrt(_clip_eigenvalues(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * cross)
    return max(value, 0.0)  # exact arithmetic gives >= 0; rounding can leave about -1e-12


# ----------------------------------------------------------------------------- features

def _batches(images, batch_size: int):
    """Split one tensor into batches, or pass an iterable of batches through."""
    if isinstance(images, torch.Tensor):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
    else:
        yield from images


def _to_uint8(x) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] images -> uint8, floats clipped and rounded as a PNG would be.

    Quantising float samples exactly as saving them would means a sampler's overshoot counts
    as it would in a saved image, and samples and the (uint8) reference take the same path.
    """
    x = torch.as_tensor(x)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1], got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or inf; the sampler diverged")
    if float(x.min()) >= 0.0 and float(x.max()) > 2.0:
        raise ValueError("these float images look like [0, 255] pixels; the metrics expect "
                         "[-1, 1] (fewstep_lab.data.images.to_model_range) or uint8")
    return from_model_range(x)


@torch.no_grad()
def feature_stats(images, classifier: CifarClassifier | None = None,
                  batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and unbiased covariance (d, d), float64, of the classifier's pooled features.

    ``images``: a (N, 3, 32, 32) tensor (uint8 in [0, 255] or float in [-1, 1]) or any
    iterable of such batches (e.g. a generator that samples a model batch by batch).
    """
    classifier = load_fd_classifier() if classifier is None else classifier
    if classifier.training:
        raise ValueError("the classifier is in training mode (BatchNorm would use batch "
                         "statistics); call classifier.eval() first")
    device = next(classifier.parameters()).device
    n, shift, s1, s2 = 0, None, None, None
    for batch in _batches(images, batch_size):
        x = to_model_range(_to_uint8(batch))
        if x.shape[-2:] != (32, 32):
            raise ValueError(f"the FD classifier reads 32x32 CIFAR-10 images, got {tuple(x.shape)}")
        f = classifier.features(x.to(device)).double().cpu()
        if shift is None:  # sums around the first batch's mean: no cancellation in float64
            shift = f.mean(0)
            s1, s2 = torch.zeros_like(shift), torch.zeros(len(shift), len(shift), dtype=torch.float64)
        f = f - shift
        n, s1, s2 = n + len(f), s1 + f.sum(0), s2 + f.T @ f
    if n < 2:
        raise ValueError(f"feature_stats needs at least 2 images, got {n}")
    mean = s1 / n
    cov = (s2 - n * torch.outer(mean, mean)) / (n - 1)
    return mean + shift, (cov + cov.T) / 2


def _classifier_key(classifier: CifarClassifier) -> str:
    """A fingerprint of the classifier's weights, so cached statistics follow the network."""
    h = hashlib.sha256()
    for name, t in sorted(classifier.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def cifar10_stats(split: str = "train", *, root=None, cache_dir=None, limit: int | None = None,
                  classifier: CifarClassifier | None = None,
                  batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """FD reference statistics (mu, cov) of a CIFAR-10 split, computed once and cached.

    The cache is a .safetensors file in ``cache_dir``, else env FEWSTEP_CACHE, else
    ``~/.cache/fewstep_lab`` (never the data folder); its name holds the split, the limit,
    a hash of the data path and a fingerprint of the classifier's weights. The full train
    split takes about a minute on 2 CPU cores the first time.
    """
    from safetensors.torch import load_file, save_file

    classifier = load_fd_classifier() if classifier is None else classifier
    source = find_cifar10(root)
    cache_dir = resolve_cache_dir(cache_dir, source)
    data_key = hashlib.sha1(str(source).encode()).hexdigest()[:8]
    name = f"fd-stats-{split}-{'all' if limit is None else limit}-{data_key}-{_classifier_key(classifier)}"
    cached = cache_dir / f"{name}.safetensors"
    if cached.is_file():
        t = load_file(str(cached))
        return t["mu"], t["cov"]
    images, _ = load_cifar10(source, split, cache_dir=cache_dir, limit=limit)
    mu, cov = feature_stats(images, classifier, batch_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
    save_file({"mu": mu.contiguous(), "cov": cov.contiguous()}, str(tmp))
    os.replace(tmp, cached)  # atomic: parallel workers never read half a file
    return mu, cov


def fd(samples, reference_stats=None, *, classifier: CifarClassifier | None = None,
       batch_size: int = 500) -> float:
    """FD: Fréchet distance between classifier-feature Gaussians of samples and a reference.

    ``samples`` as in ``feature_stats``; ``reference_stats`` a (mu, cov) pair, by default
    ``cifar10_stats('train')`` of the same classifier. Not FID: see the module docstring.
    """
    classifier = load_fd_classifier() if classifier is None else classifier
    if reference_stats is None:
        reference_stats = cifar10_stats("train", classifier=classifier, batch_size=batch_size)
    mu, cov = feature_stats(samples, classifier, batch_size)
    return frechet_distance(mu, cov, *reference_stats)


@torch.no_grad()
def classifier_accuracy(images, labels, *, classifier: CifarClassifier | None = None, batch_size: int = 500) -> float:
    """The fraction of images the shipped classifier assigns to their label: a class-fidelity score.

    For class-conditional generation this plays the part a CLIP score plays for text-to-image
    models (Hessel et al. 2021): how often a sample shows the class it was asked for. ``images``
    (N, 3, 32, 32) uint8 or float in [-1, 1] (quantised as saved), ``labels`` (N,) CIFAR-10
    class indices 0..9. Bounded above by the classifier's own accuracy on real images.
    """
    classifier = load_fd_classifier() if classifier is None else classifier
    if classifier.training:
        raise ValueError("the classifier is in training mode; call classifier.eval() first")
    labels = torch.as_tensor(labels).long().cpu()
    images = torch.as_tensor(images)
    if labels.ndim != 1 or len(labels) != len(images) or len(labels) == 0:
        raise ValueError(f"need one label per image, got {tuple(labels.shape)} labels for {len(images)} images")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError("labels must be CIFAR-10 class indices 0..9 (drop the 'no label' entries first)")
    device = next(classifier.parameters()).device
    correct = 0
    for i in range(0, len(images), batch_size):
        x = to_model_range(_to_uint8(images[i:i + batch_size]))
        if x.shape[-2:] != (32, 32):
            raise ValueError(f"the classifier reads 32x32 CIFAR-10 images, got {tuple(x.shape)}")
        correct += int((classifier(x.to(device)).argmax(1).cpu() == labels[i:i + batch_size]).sum())
    return correct / len(labels)


# ----------------------------------------------------------------------------- real FID

class _Uint8Images(torch.utils.data.Dataset):
    """(N, 3, H, W) uint8 tensor as the map-style dataset torch-fidelity reads."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def fid(samples, reference=None, *, batch_size: int = 64, root=None, cache_dir=None) -> float:
    """FID (Heusel et al. 2017) with torch-fidelity's Inception-v3, from the file in FEWSTEP_INCEPTION_WEIGHTS.

    ``samples`` and ``reference`` (default: the CIFAR-10 train split): (N, 3, H, W) uint8 or
    float in [-1, 1]. Needs ``pip install torch-fidelity`` and its weights file
    (weights-inception-2015-12-05-6726825d.pth); nothing is downloaded.
    """
    weights = os.environ.get(INCEPTION_ENV)
    if not weights:
        raise RuntimeError(
            f"fid() needs Inception-v3 weights and downloads nothing: set {INCEPTION_ENV} to "
            "the path of torch-fidelity's weights-inception-2015-12-05-6726825d.pth (and "
            "`pip install torch-fidelity`). Without them use fd(), the course's "
            "classifier-feature distance (not comparable with published FID).")
    if not Path(weights).expanduser().is_file():
        raise FileNotFoundError(f"{INCEPTION_ENV}={weights} is not a file")
    try:
        import torch_fidelity
    except ImportError as err:
        raise ImportError("fid() needs torch-fidelity, which fewstep_lab does not install: "
                          "`pip install torch-fidelity` (it must not replace your torch)") from err

    if reference is None:
        reference, _ = load_cifar10(root, "train", cache_dir=cache_dir)
    # save_cpu_ram=True only sets the DataLoader's num_workers to 0 (else 4 worker processes,
    # pure overhead for images already in memory, and warned about on 2-core machines).
    metrics = torch_fidelity.calculate_metrics(
        input1=_Uint8Images(_to_uint8(samples).cpu()),
        input2=_Uint8Images(_to_uint8(reference).cpu()),
        fid=True, feature_extractor_weights_path=str(Path(weights).expanduser()),
        batch_size=batch_size, cuda=torch.cuda.is_available(), cache=False,
        datasets_download=False, save_cpu_ram=True, verbose=False)
    # torch-fidelity does not clip: identical sets give about -1e-6 (float32 features).
    return max(float(metrics["frechet_inception_distance"]), 0.0)
