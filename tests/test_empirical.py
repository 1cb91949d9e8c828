"""Tests for fewstep_lab.data.empirical: the exact denoiser and consistency function of a set of images."""

import pytest
import torch

from fewstep_lab.data.empirical import EmpiricalDenoiser, exact_consistency_function
from fewstep_lab.data.toy2d import GaussianMixture
from fewstep_lab.sampling import heun_step
from fewstep_lab.schedules import karras_sigmas

torch.set_num_threads(1)  # many tiny float64 products: threads only add overhead on a shared CPU
DT = torch.float64


def tiny_images(k=5, shape=(2, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((k,) + shape, generator=g, dtype=DT) * 2 - 1


def brute_force(X, x, sigma, std):
    """Loop over images and batch: softmax of log-likelihoods, then the smoothed posterior mean."""
    out = []
    for b in range(x.shape[0]):
        var = float(sigma[b]) ** 2 + std ** 2
        logits = torch.stack([-((x[b] - Xk) ** 2).sum() / (2 * var) for Xk in X])
        r = torch.softmax(logits, 0)
        post = [Xk + std ** 2 / var * (x[b] - Xk) for Xk in X]  # E[x0 | x, component k]
        out.append(sum(rk * pk for rk, pk in zip(r, post)))
    return torch.stack(out)


@pytest.mark.parametrize("std", [0.0, 0.3])
@pytest.mark.parametrize("chunk_size", [1, 2, 1024])
def test_denoiser_matches_brute_force_and_gaussian_mixture(std, chunk_size):
    X = tiny_images()
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.05, 0.4, 2.0, 30.0], dtype=DT)
    x = X[torch.tensor([0, 2, 4, 1])] + sigma.view(-1, 1, 1, 1) * torch.randn((4,) + X.shape[1:], generator=g, dtype=DT)
    D = EmpiricalDenoiser(X, std=std, chunk_size=chunk_size)
    out = D(x, sigma)
    assert out.shape == x.shape and out.dtype == DT
    torch.testing.assert_close(out, brute_force(X, x, sigma, std), rtol=1e-10, atol=1e-10)
    # An independent implementation: toy2d's Gaussian mixture with one component per image.
    gm = GaussianMixture(X.flatten(1), std ** 2)
    torch.testing.assert_close(out.flatten(1), gm.denoiser(x.flatten(1), sigma), rtol=1e-8, atol=1e-8)


def test_scalar_sigma_float32_and_large_sigma_mean():
    X = tiny_images()
    D = EmpiricalDenoiser(X.float())
    x = torch.zeros((3,) + X.shape[1:])
    out = D(x, 1e4)  # far away every image is equally likely: the mean image
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, X.float().mean(0).expand_as(out), rtol=1e-5, atol=1e-5)


def test_tiny_sigma_returns_nearest_image_without_overflow():
    X = tiny_images(k=7)
    g = torch.Generator().manual_seed(2)
    idx = torch.tensor([3, 0, 6])
    x = X[idx] + 0.05 * torch.randn((3,) + X.shape[1:], generator=g, dtype=DT)
    D = EmpiricalDenoiser(X, chunk_size=3)
    assert torch.equal(D.nearest(x), idx)
    out = D(x, 1e-3)  # logits ~ -1e5: a naive exp would give 0 / 0
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, X[idx], rtol=0, atol=1e-12)


def test_smoothing_at_sigma_zero_is_identity_and_std_changes_the_answer():
    X = tiny_images()
    x = X[:2] + 0.3
    torch.testing.assert_close(EmpiricalDenoiser(X, std=0.2)(x, 0.0), x)  # no noise: E[x0 | x] = x
    a, b = EmpiricalDenoiser(X)(x, 0.5), EmpiricalDenoiser(X, std=0.2)(x, 0.5)
    assert (a - b).abs().max() > 1e-3


def test_denoiser_errors_name_the_fix():
    X = tiny_images()
    with pytest.raises(ValueError, match="to_model_range"):
        EmpiricalDenoiser((X * 100).to(torch.uint8))
    with pytest.raises(ValueError, match="std"):
        EmpiricalDenoiser(X, std=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        EmpiricalDenoiser(X, chunk_size=0)
    D = EmpiricalDenoiser(X)
    with pytest.raises(ValueError, match="stored images"):
        D(torch.zeros(2, 3, 3, 3, dtype=DT), 1.0)
    with pytest.raises(ValueError, match="unconditional"):
        D(X[:1], 1.0, cond=torch.tensor([0]))


def test_boundary_condition_is_exact():
    D = EmpiricalDenoiser(tiny_images())
    f = exact_consistency_function(D, sigma_min=0.002)
    x = torch.randn(4, 2, 3, 3)
    assert torch.equal(f(x, 0.002), x)
    # A mixed batch: the elements at sigma_min come back bit-for-bit, the others move.
    sigma = torch.tensor([0.002, 5.0, 0.002, 1.0])
    out = f(x, sigma)
    assert torch.equal(out[[0, 2]], x[[0, 2]])
    assert (out[[1, 3]] - x[[1, 3]]).abs().amax() > 0.1
    with pytest.raises(ValueError, match="sigma_min"):
        f(x, 0.001)


def test_per_element_sigmas_match_separate_calls():
    D = EmpiricalDenoiser(tiny_images())
    f = exact_consistency_function(D, steps=6)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 3, 3, generator=g, dtype=DT) * 3
    sigma = torch.tensor([3.0, 0.7, 12.0], dtype=DT)
    batched = f(x, sigma)
    for b in range(3):
        torch.testing.assert_close(batched[b:b + 1], f(x[b:b + 1], float(sigma[b])), rtol=1e-12, atol=1e-12)


def heun_to(D, x, sigma, target, n=100):
    """A fine Heun integration of the PF-ODE from sigma down to target (> 0): the 'exact' trajectory."""
    grid = karras_sigmas(n, sigma_min=target, sigma_max=sigma).double()[:-1]
    for s, sn in zip(grid[:-1].tolist(), grid[1:].tolist()):
        x, _ = heun_step(D, x, s, sn)
    return x


def test_consistency_along_one_exact_trajectory():
    """Song et al. 2023, eq. 3: f is constant along a PF-ODE trajectory (here up to solver error)."""
    X = tiny_images(k=6)
    D = EmpiricalDenoiser(X, std=0.1)  # smoothing keeps the end points off the stored images
    f = exact_consistency_function(D, steps=48)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 2, 3, 3, generator=g, dtype=DT) * 10.0
    start = f(x, 10.0)
    for target in (2.0, 0.5, 0.05):
        torch.testing.assert_close(f(heun_to(D, x, 10.0, target), target), start, rtol=0, atol=2e-3)
    # ...and the constant is not trivial: different starting points give different answers.
    assert (start[0] - start[1]).abs().max() > 0.1


def test_more_steps_converge_and_steps_is_validated():
    X = tiny_images(k=6)
    D = EmpiricalDenoiser(X, std=0.1)
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(5), dtype=DT) * 20
    fine = exact_consistency_function(D, steps=200)(x, 20.0)
    errs = [(exact_consistency_function(D, steps=n)(x, 20.0) - fine).abs().max().item() for n in (2, 8, 32)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-2, errs
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            exact_consistency_function(D, steps=bad)
