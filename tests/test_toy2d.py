"""Tests for fewstep_lab.data.toy2d: the exact mixture denoiser against Tweedie's formula on the
log-density, the log-density against torch.distributions, and the samplers of every toy set."""

import math

import pytest
import torch
from torch import distributions as dist

from fewstep_lab.data.toy2d import DATASETS, GaussianMixture, SampleOnly, gaussian, get_dataset
from helpers import DT, assert_moments

torch.set_num_threads(1)
MIXTURES = ["8gaussians", "grid25", "5gaussians", "gaussian"]
SIGMAS = [0.003, 0.05, 0.4, 2.0, 30.0]


def _reference(gm, sigma):
    """The noisy marginal built by torch.distributions: an independent implementation."""
    eye = torch.eye(gm.dim, dtype=DT)
    comps = dist.MultivariateNormal(gm.means, covariance_matrix=gm.covs + sigma**2 * eye)
    return dist.MixtureSameFamily(dist.Categorical(probs=gm.weights), comps)


def _points(gm, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Data points plus wide noise: both near the modes and far out in the tails.
    return torch.cat([gm.sample(n // 2, g).to(DT), 1.5 * torch.randn(n - n // 2, gm.dim, generator=g, dtype=DT)])


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_log_prob_matches_torch_distributions(name, sigma):
    gm = get_dataset(name)
    x = _points(gm)
    torch.testing.assert_close(gm.log_prob(x, sigma), _reference(gm, sigma).log_prob(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_denoiser_is_tweedie(name, sigma):
    """D(x, sigma) = x + sigma^2 grad log p_sigma(x) (Tweedie), with the gradient from autograd."""
    gm = get_dataset(name)
    x = _points(gm).requires_grad_(True)
    (grad,) = torch.autograd.grad(_reference(gm, sigma).log_prob(x).sum(), x)
    x = x.detach()
    torch.testing.assert_close(gm.denoiser(x, sigma), x + sigma**2 * grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gm.score(x, sigma), grad, rtol=1e-8, atol=1e-8 / sigma**2)
    # (B,) sigma tensors and a float32 input are accepted too.
    s = torch.full((x.shape[0],), sigma, dtype=DT)
    torch.testing.assert_close(gm(x, s), gm.denoiser(x, sigma), rtol=0, atol=0)
    assert gm.denoiser(x.float(), sigma).dtype == torch.float32


def test_denoiser_monte_carlo():
    """E[x0 | x] estimated by binning noisy samples agrees with the closed form (a 1-D mixture)."""
    gm = GaussianMixture([[-1.0], [0.8]], [0.05, 0.2], weights=[0.3, 0.7])
    g = torch.Generator().manual_seed(0)
    n, sigma = 400_000, 0.6
    x0 = gm.sample(n, g).to(DT)
    x = x0 + sigma * torch.randn(n, 1, generator=g, dtype=DT)
    edges = torch.linspace(-1.5, 1.5, 13, dtype=DT)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = ((x >= lo) & (x < hi))[:, 0]
        mc = x0[inside].mean()
        se = x0[inside].std() / math.sqrt(inside.sum())
        # Closed form averaged over the same points (the bin is not a single x).
        exact = gm.denoiser(x[inside], sigma).mean()
        assert abs(mc - exact) < 5 * se, (lo.item(), mc.item(), exact.item(), se.item())


def test_denoiser_limits_and_shape_check():
    gm = get_dataset("5gaussians")
    x = _points(gm)
    torch.testing.assert_close(gm.denoiser(x, 1e-5), x, rtol=0, atol=1e-4)  # no noise: D = x ...
    mean, _ = gm.mean_and_cov()
    torch.testing.assert_close(gm.denoiser(x, 1e4), mean.expand_as(x), rtol=0, atol=1e-4)  # ... all noise: E[x0]
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        gm.denoiser(torch.zeros(3, 3), 1.0)


def test_scalar_covariance_mixture():
    """A scalar covariance (shared isotropic variance) works in float64 like the other forms."""
    a = GaussianMixture([[0.0, 0.0], [1.0, 1.0]], 0.04)
    b = GaussianMixture([[0.0, 0.0], [1.0, 1.0]], [0.04, 0.04])
    assert a.covs.dtype == DT and torch.equal(a.covs, b.covs)
    x = _points(a)
    torch.testing.assert_close(a.denoiser(x, 0.3), b.denoiser(x, 0.3), rtol=0, atol=0)


@pytest.mark.parametrize("name", MIXTURES)
def test_mixture_moments_and_sampling(name):
    gm = get_dataset(name)
    mean, cov = gm.mean_and_cov()
    ref = _reference(gm, 0.0)
    torch.testing.assert_close(mean, ref.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.diagonal(cov), ref.variance, rtol=1e-12, atol=1e-12)
    x = gm.sample(100_000, torch.Generator().manual_seed(1))
    assert x.dtype == torch.float32 and x.shape == (100_000, 2)
    assert_moments(x, mean, cov)
    assert torch.equal(x[:10], gm.sample(100_000, torch.Generator().manual_seed(1))[:10])


def test_responsibilities_and_assign():
    gm = get_dataset("8gaussians")
    x, labels = gm.sample(2000, torch.Generator().manual_seed(2), return_labels=True)
    r = gm.responsibilities(x, 0.1)
    torch.testing.assert_close(r.sum(1), torch.ones(2000, dtype=DT))
    assert (gm.assign(x) == labels).float().mean() > 0.999  # std 0.05, modes 0.54 apart


@pytest.mark.parametrize("n", [1, 7, 100, 1001])
def test_stratified_counts(n):
    gm = get_dataset("5gaussians")
    x, labels = gm.sample(n, stratified=True, return_labels=True)
    counts = torch.bincount(labels, minlength=5)
    assert x.shape == (n, 2) and counts.sum() == n
    assert ((counts - gm.weights * n).abs() < 1).all(), counts.tolist()
    # Largest remainders get the leftover points: round(n w_k) whenever those sum to n.
    rounded = torch.round(gm.weights * n).long()
    if rounded.sum() == n:
        assert counts.tolist() == rounded.tolist()
    if n == 7:
        assert counts.tolist() == [2, 2, 1, 1, 1]


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_samples_sane_points(name):
    ds = get_dataset(name)
    x = ds.sample(20_000, torch.Generator().manual_seed(3))
    assert x.shape == (20_000, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    std = x.std(0)
    assert ((std > 0.2) & (std < 0.8)).all(), std.tolist()
    assert (x.mean(0).abs() < 0.3).all()
    again = ds.sample(20_000, torch.Generator().manual_seed(3))
    assert torch.equal(x, again)
    with pytest.raises(ValueError, match="n must be >= 1"):
        ds.sample(0)


def test_sample_only_and_unknown_name():
    assert isinstance(get_dataset("moons"), SampleOnly)
    assert isinstance(get_dataset("gaussian"), GaussianMixture)
    with pytest.raises(ValueError, match=r"unknown toy dataset 'spiral'; choose one of \['5gaussians'"):
        get_dataset("spiral")


def test_mixture_bad_input():
    with pytest.raises(ValueError, match=r"means must have shape \(K, d\)"):
        GaussianMixture([0.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="covs must be"):
        GaussianMixture([[0.0, 1.0]], torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match="weights must be K non-negative numbers summing to 1"):
        GaussianMixture([[0.0], [1.0]], 1.0, weights=[0.5, 0.6])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([[0.0], [1.0]], 1.0, weights=[1.5, -0.5])


def test_gaussian_parameters():
    g = gaussian(mean=(0.3, -0.2), std=0.7)
    m, c = g.mean_and_cov()
    torch.testing.assert_close(m, torch.tensor([0.3, -0.2], dtype=DT))
    torch.testing.assert_close(c, 0.49 * torch.eye(2, dtype=DT))
