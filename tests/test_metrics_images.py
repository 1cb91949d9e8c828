"""Tests of FD, the classifier it rests on, and the guarded FID (fewstep_lab/metrics_images.py)."""

import pickle
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn

from fewstep_lab import metrics_images as mi
from fewstep_lab.data import images as im
from fewstep_lab.nets.classifier import CifarClassifier

SHARED = im.REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared CIFAR-10 copy at {SHARED}")


def random_cov(d, seed, rank=None):
    g = np.random.default_rng(seed)
    a = g.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


def rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


# ----------------------------------------------------------------------------- frechet_distance

def test_identical_gaussians_give_zero():
    mu, cov = np.arange(6.0), random_cov(6, 0)
    assert abs(mi.frechet_distance(mu, cov, mu, cov)) < 1e-9


def test_shifted_means_give_squared_shift():
    cov = random_cov(5, 1)
    mu1, mu2 = np.zeros(5), np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert mi.frechet_distance(mu1, cov, mu2, cov) == pytest.approx(1 + 4 + 0.25 + 9, abs=1e-8)


@pytest.mark.parametrize("rotate", [False, True])
def test_commuting_covariances_closed_form(rotate):
    # Diagonal (or jointly rotated, hence commuting) covariances: |dmu|^2 + sum (sqrt a - sqrt b)^2.
    # b has a zero eigenvalue: eigh returns it as +-1e-15, whose square root (3e-8) used to leak into
    # the result on some BLAS; rel=1e-7 is float64's honest accuracy here and still catches any real
    # error (a wrong cross term is off by O(1)).
    a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 0.25, 0.0])
    mu1, mu2 = np.array([0.0, 1.0, 0.0, 0.0]), np.array([0.0, 0.0, 2.0, 0.0])
    q = rotation(4, 3) if rotate else np.eye(4)
    cov1, cov2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # 1 + 1 + 0 + 9 = 11 from the covs
    assert mi.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("seed", range(5))
def test_zero_eigenvalues_give_exact_roots(seed):
    # Rotated PSD matrices with several zero eigenvalues: the root squares back, its zero directions stay
    # zero (not ~1e-8 from rounding), and FD matches the closed form for commuting covariances.
    d = 12
    q = rotation(d, seed)
    a = np.r_[np.random.default_rng(seed).uniform(0.5, 9.0, d - 3), 0.0, 0.0, 0.0]
    b = np.r_[np.zeros(3), np.random.default_rng(seed + 10).uniform(0.5, 9.0, d - 3)]
    cov1, cov2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    root = mi._psd_sqrt(cov1)
    np.testing.assert_allclose(root @ root, cov1, atol=1e-12)
    assert np.abs(root @ q[:, -3:]).max() < 1e-12  # no sqrt(rounding noise) in the null space
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert mi.frechet_distance(np.zeros(d), cov1, np.zeros(d), cov2) == pytest.approx(expected, rel=1e-7)


def test_singular_covariances_stay_real_and_exact():
    # Rank-deficient covariances, as with fewer samples than feature dimensions.
    cov1, cov2 = np.diag([1.0, 0.0, 0.0]), np.diag([0.0, 4.0, 0.0])
    assert mi.frechet_distance(np.zeros(3), cov1, np.zeros(3), cov2) == pytest.approx(5.0, abs=1e-9)


def test_symmetric_nonnegative_and_matches_scipy_sqrtm():
    from scipy.linalg import sqrtm

    for seed in range(5):
        d = 8
        mu1, mu2 = np.random.default_rng(seed).standard_normal((2, d))
        cov1, cov2 = random_cov(d, 10 + seed), random_cov(d, 20 + seed, rank=3)
        ab = mi.frechet_distance(mu1, cov1, mu2, cov2)
        ba = mi.frechet_distance(mu2, cov2, mu1, cov1)
        # Independent route: the textbook formula with a general matrix square root.
        ref = ((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * sqrtm(cov1 @ cov2).real)
        assert ab >= 0 and ab == pytest.approx(ba, rel=1e-8) and ab == pytest.approx(ref, rel=1e-6)


def test_accepts_torch_and_rejects_bad_shapes():
    mu, cov = torch.zeros(3), torch.eye(3)
    assert mi.frechet_distance(mu, cov, mu + 1, 4 * cov) == pytest.approx(3 + 3, abs=1e-9)
    with pytest.raises(ValueError, match="shape"):
        mi.frechet_distance(mu, cov, torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        mi.frechet_distance(mu, cov * float("nan"), mu, cov)


# ----------------------------------------------------------------------------- feature_stats

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CifarClassifier(widths=(4, 6, 8)).eval()


def test_feature_stats_match_direct_computation_in_any_batching(tiny):
    images = torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        f = tiny.features(im.to_model_range(images)).double()
    mu, cov = mi.feature_stats(images, tiny, batch_size=10)  # batches of 10, 10, 10, 7
    assert mu.shape == (8,) and cov.shape == (8, 8)
    torch.testing.assert_close(mu, f.mean(0))
    torch.testing.assert_close(cov, torch.cov(f.T))
    as_floats = (im.to_model_range(images[i:i + 16]) for i in range(0, 37, 16))  # an iterable
    mu2, cov2 = mi.feature_stats(as_floats, tiny)
    torch.testing.assert_close(mu2, mu)
    torch.testing.assert_close(cov2, cov)


def test_feature_stats_rejects_bad_inputs(tiny):
    x = torch.zeros(4, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 255\] pixels"):
        mi.feature_stats(x + 100, tiny)  # [0, 255] floats
    mi.feature_stats(torch.randn(4, 3, 32, 32) * 5, tiny)  # a diverging sampler: clipped, accepted
    with pytest.raises(ValueError, match="diverged"):
        mi.feature_stats(x * float("nan"), tiny)
    with pytest.raises(ValueError, match="32x32"):
        mi.feature_stats(torch.zeros(4, 3, 16, 16), tiny)
    with pytest.raises(ValueError, match="eval"):
        mi.feature_stats(x, CifarClassifier(widths=(4, 6, 8)))  # still in training mode


def test_fd_of_a_sample_against_its_own_stats_is_zero(tiny):
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    stats = mi.feature_stats(images, tiny)
    assert mi.fd(images, stats, classifier=tiny) < 1e-8
    assert mi.fd(images // 2, stats, classifier=tiny) > 1e-3  # darker images are different


# ----------------------------------------------------------------------------- shipped classifier

def test_shipped_classifier_loads_without_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the weights must be read with safetensors, not unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model = mi.load_fd_classifier()
    info = mi.classifier_info()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.feature_dim == info["feature_dim"]
    assert mi.CLASSIFIER_WEIGHTS.stat().st_size < 5e6


def test_missing_weights_error_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_fd_classifier"):
        mi.load_fd_classifier(tmp_path / "nope.safetensors")


@pytest.fixture(scope="module")
def test_subset(tmp_path_factory):
    """The first 100 test images of each class (1,000), decoded into a private cache."""
    return im.load_cifar10(SHARED, "test", cache_dir=tmp_path_factory.mktemp("c"), limit=1000)


@needs_shared
def test_shipped_accuracy_matches_its_record(test_subset):
    model, info = mi.load_fd_classifier(), mi.classifier_info()
    x, y = test_subset
    keep = torch.cat([torch.arange(c * 100, c * 100 + 20) for c in range(10)])  # = limit=200
    with torch.no_grad():
        acc = float((model(im.to_model_range(x[keep])).argmax(1) == y[keep]).float().mean())
    assert abs(acc - info["test_accuracy_first200"]) <= 2 / 200  # same images: ~exact
    p = info["test_accuracy"]
    assert abs(acc - p) < 4 * (p * (1 - p) / 200) ** 0.5  # binomial spread of 200 draws
    assert p > 0.5  # a network that learnt something


@needs_shared
def test_fd_separates_real_from_degraded(test_subset):
    model = mi.load_fd_classifier()
    x = test_subset[0]
    a, b = x[0::2], x[1::2]  # two disjoint, class-balanced halves of 500
    ref = mi.feature_stats(a, model)
    real = mi.fd(b, ref, classifier=model)
    xb = im.to_model_range(b)
    blurred = Fn.avg_pool2d(Fn.pad(xb, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    noisy = (xb + 0.2 * torch.randn(xb.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    blur_fd, noise_fd = mi.fd(blurred, ref, classifier=model), mi.fd(noisy, ref, classifier=model)
    assert real > 0
    # Measured: real 0.25, blurred 4.8, noisy 3.3 (FD of 500 vs 500 test images).
    assert blur_fd > 5 * real and noise_fd > 5 * real, (real, blur_fd, noise_fd)


@needs_shared
def test_cifar10_stats_are_cached_outside_the_data(tmp_path, monkeypatch, tiny):
    first = mi.cifar10_stats("test", root=SHARED, cache_dir=tmp_path, limit=30, classifier=tiny)
    assert len(list(tmp_path.glob("fd-stats-test-30-*.safetensors"))) == 1
    x, _ = im.load_cifar10(SHARED, "test", cache_dir=tmp_path, limit=30)
    direct = mi.feature_stats(x, tiny)
    torch.testing.assert_close(first[0], direct[0])
    torch.testing.assert_close(first[1], direct[1])

    def no_recompute(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(mi, "feature_stats", no_recompute)
    again = mi.cifar10_stats("test", root=SHARED, cache_dir=tmp_path, limit=30, classifier=tiny)
    torch.testing.assert_close(again[1], first[1])
    with pytest.raises(ValueError, match="inside the data folder"):
        mi.cifar10_stats("test", root=SHARED, cache_dir=SHARED / "cache", limit=30, classifier=tiny)


# ----------------------------------------------------------------------------- FID guard

def test_fid_needs_weights_then_the_package(tmp_path, monkeypatch):
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    monkeypatch.delenv(mi.INCEPTION_ENV, raising=False)
    with pytest.raises(RuntimeError, match="FEWSTEP_INCEPTION_WEIGHTS") as err:
        mi.fid(x, x)
    assert "downloads nothing" in str(err.value) and "fd()" in str(err.value)
    monkeypatch.setenv(mi.INCEPTION_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="not a file"):
        mi.fid(x, x)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    monkeypatch.setenv(mi.INCEPTION_ENV, str(weights))
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails even if installed
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        mi.fid(x, x)


def _check_fid_script():
    """scripts/check_fid.py as a module: its stand-in weights builder and image sets."""
    import importlib.util

    path = im.REPO_ROOT / "scripts" / "check_fid.py"
    spec = importlib.util.spec_from_file_location("check_fid", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fid_runs_end_to_end_on_standin_weights(tmp_path, monkeypatch):
    # Random Inception-v3 weights (right architecture): checks the plumbing, not the values.
    # About 20 s on one CPU thread, mostly torch-fidelity's 2048x2048 eigvals per call.
    pytest.importorskip("torch_fidelity")
    from PIL import Image

    check = _check_fid_script()
    monkeypatch.setenv(mi.INCEPTION_ENV, str(check.standin_inception_weights(tmp_path / "w.pth")))
    # The default reference: a tiny CIFAR-10 ImageFolder (one image per class and split).
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (10, 32, 32, 3), dtype=torch.uint8, generator=g)
    for split in ("train", "test"):
        for c, name in enumerate(im.CLASSES):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            Image.fromarray(pixels[c].numpy()).save(tmp_path / "data" / split / name / "0.png")
    reference, _ = im.load_cifar10(tmp_path / "data", "train", cache_dir=tmp_path / "cache")
    # Same images, given as floats in [-1, 1] against the uint8 default reference: ~0.
    same = mi.fid(im.to_model_range(reference), root=tmp_path / "data", cache_dir=tmp_path / "cache")
    a, a2, b = check.image_sets(8)
    draws, other = mi.fid(a, a2, batch_size=16), mi.fid(a, b, batch_size=16)
    assert isinstance(same, float) and 0.0 <= same < 1e-3 * other
    assert np.isfinite(draws) and 0.0 < draws < other / 3
