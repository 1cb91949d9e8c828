"""Tests for fewstep_lab.schedules against closed forms (EDM eq. 5) and diffusers' schedulers."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from fewstep_lab.schedules import (DiscreteSchedule, alpha_bar_to_sigma, alphas_cumprod, append_zero,
                                   check_sigmas, ddpm_cosine_alphas_cumprod, ddpm_linear_alphas_cumprod,
                                   karras_sigmas, loglinear_sigmas, sample_lognormal_sigma,
                                   sigma_to_alpha_bar)

torch.set_num_threads(1)
DT = torch.float64


def edm_eq5(n, sigma_min, sigma_max, rho):
    """EDM eq. 5 written out in numpy float64, i = 0..n-1, then the final 0."""
    i = np.arange(n, dtype=np.float64)
    s = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return np.append(s, 0.0)


# ------------------------------------------------------------------ sigma grids


@pytest.mark.parametrize("n, sigma_min, sigma_max, rho", [(2, 0.002, 80.0, 7.0), (18, 0.002, 80.0, 7.0),
                                                           (40, 0.01, 10.0, 3.0), (7, 0.5, 1.0, 1.0)])
def test_karras_sigmas_match_eq5(n, sigma_min, sigma_max, rho):
    s = karras_sigmas(n, sigma_min, sigma_max, rho)
    assert s.shape == (n + 1,)
    assert s[-1] == 0
    assert (s[1:] < s[:-1]).all()
    assert math.isclose(s[0].item(), sigma_max, rel_tol=1e-6)
    assert math.isclose(s[-2].item(), sigma_min, rel_tol=1e-6)
    np.testing.assert_allclose(s.double().numpy(), edm_eq5(n, sigma_min, sigma_max, rho), rtol=1e-6)
    check_sigmas(s)


def test_karras_sigmas_single_step_and_device():
    assert karras_sigmas(1, sigma_max=5.0).tolist() == [5.0, 0.0]
    assert karras_sigmas(4, device="cpu").device.type == "cpu"


def test_loglinear_sigmas_are_geometric():
    s = loglinear_sigmas(10, 0.01, 100.0).double()
    assert s.shape == (11,) and s[-1] == 0
    ratios = s[1:-1] / s[:-2]
    np.testing.assert_allclose(ratios.numpy(), (0.01 / 100.0) ** (1 / 9), rtol=1e-6)
    assert math.isclose(s[0].item(), 100.0, rel_tol=1e-6) and math.isclose(s[-2].item(), 0.01, rel_tol=1e-6)
    assert loglinear_sigmas(1, sigma_max=3.0).tolist() == [3.0, 0.0]


def test_append_zero():
    assert append_zero(torch.tensor([3.0, 1.0])).tolist() == [3.0, 1.0, 0.0]


@pytest.mark.parametrize("fn", [karras_sigmas, loglinear_sigmas])
def test_grid_bad_arguments(fn):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        fn(0)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        fn(2.5)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        fn(5, sigma_min=1.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        fn(5, sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="0 < sigma_min"):
        fn(5, sigma_min=0.0, sigma_max=1.0)


@pytest.mark.parametrize("grid, message", [
    ([1.0, 2.0, 0.0], "strictly decreasing"),
    ([2.0, 2.0, 0.0], "strictly decreasing"),
    ([2.0, 1.0, -0.5], "non-negative"),
    ([], "at least 2 values"),
    ([0.0], "at least 2 values"),
    ([[2.0, 0.0]], "1-D"),
    ([2.0, float("nan"), 0.0], "NaN"),
    ([float("inf"), 1.0, 0.0], "inf"),
    ([2.0, 1.0, 0.5], "end in 0"),
])
def test_check_sigmas_rejects(grid, message):
    with pytest.raises(ValueError, match=message):
        check_sigmas(grid)


def test_check_sigmas_accepts_list_and_returns_tensor():
    out = check_sigmas([2.0, 1.0, 0.0])
    assert isinstance(out, torch.Tensor) and out.tolist() == [2.0, 1.0, 0.0]


# ------------------------------------------------------------------ DDPM / VP


def test_linear_alphas_cumprod_match_diffusers():
    theirs = DDPMScheduler(beta_schedule="linear").alphas_cumprod.to(DT)  # float32 inside diffusers
    ours = ddpm_linear_alphas_cumprod(1000)
    assert ours.dtype == DT and ours.shape == (1000,)
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=0)
    torch.testing.assert_close(alphas_cumprod("linear"), ours, rtol=0, atol=0)


def test_cosine_alphas_cumprod_match_diffusers():
    theirs = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.to(DT)
    ours = ddpm_cosine_alphas_cumprod(1000)
    # float32 rounding in diffusers grows to ~1e-5 relative in the vanishing tail.
    torch.testing.assert_close(ours, theirs, rtol=5e-5, atol=0)
    torch.testing.assert_close(ours[:900], theirs[:900], rtol=2e-6, atol=0)
    torch.testing.assert_close(alphas_cumprod("cosine"), ours, rtol=0, atol=0)
    # Nichol & Dhariwal eq. 17 directly, away from the beta clipping at the end.
    t = torch.arange(1, 901, dtype=DT) / 1000
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    torch.testing.assert_close(ours[:900], f(t) / f(torch.zeros(1, dtype=DT)), rtol=1e-12, atol=0)


def test_alphas_cumprod_bad_input():
    with pytest.raises(ValueError, match="unknown DDPM schedule 'quadratic'"):
        alphas_cumprod("quadratic")
    for fn in (ddpm_linear_alphas_cumprod, ddpm_cosine_alphas_cumprod):
        with pytest.raises(ValueError, match="num_steps must be >= 1"):
            fn(0)


def test_alpha_bar_sigma_round_trip():
    ab = torch.linspace(1e-5, 1 - 1e-5, 101, dtype=DT)
    sigma = alpha_bar_to_sigma(ab)
    torch.testing.assert_close(sigma, torch.sqrt((1 - ab) / ab), rtol=1e-14, atol=0)
    torch.testing.assert_close(sigma_to_alpha_bar(sigma), ab, rtol=1e-12, atol=0)
    s = torch.logspace(-3, 3, 50, dtype=DT)
    torch.testing.assert_close(alpha_bar_to_sigma(sigma_to_alpha_bar(s)), s, rtol=1e-10, atol=0)
    # The VP sample is the sigma-space sample scaled by sqrt(abar) = 1 / sqrt(1 + sigma^2).
    x0, eps = torch.randn(2, 5, dtype=DT)
    x = x0 + sigma[:, None] * eps
    x_vp = ab[:, None].sqrt() * x0 + (1 - ab[:, None]).sqrt() * eps
    torch.testing.assert_close(x / (1 + sigma[:, None] ** 2).sqrt(), x_vp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_discrete_schedule_t_of_sigma(kind):
    ac = alphas_cumprod(kind)
    sch = DiscreteSchedule(ac)
    assert sch.num_steps == 1000
    assert sch.sigma_min == alpha_bar_to_sigma(ac[0]).item() and sch.sigma_max == alpha_bar_to_sigma(ac[-1]).item()
    t_int = torch.arange(1000, dtype=DT)
    # On the grid: exact integers both ways.
    assert torch.equal(sch.sigma_of_t(t_int), alpha_bar_to_sigma(ac))
    assert torch.equal(sch.t_of_sigma(sch.sigmas), t_int)
    # Off the grid: t_of_sigma inverts sigma_of_t, and interpolates log sigma linearly.
    t = torch.rand(500, generator=torch.Generator().manual_seed(0), dtype=DT) * 999
    torch.testing.assert_close(sch.t_of_sigma(sch.sigma_of_t(t)), t, rtol=0, atol=1e-9)
    lo = t.floor().long()
    w = t - lo
    expected = torch.exp((1 - w) * sch.sigmas[lo].log() + w * sch.sigmas[lo + 1].log())
    torch.testing.assert_close(sch.sigma_of_t(t), expected, rtol=1e-12, atol=0)
    # Outside the range: clamped to [0, T-1].
    assert sch.t_of_sigma(torch.tensor([1e-6, 1e6])).tolist() == [0.0, 999.0]


@pytest.mark.parametrize("n", [1, 7, 10, 30, 50, 1000])
def test_ddim_timesteps_match_diffusers(n):
    sch = DiscreteSchedule(alphas_cumprod("linear"))
    theirs = DDIMScheduler(num_train_timesteps=1000)
    theirs.set_timesteps(n)
    assert sch.ddim_timesteps(n).tolist() == theirs.timesteps.tolist()
    grid = sch.ddim_sigmas(n)
    assert grid.shape == (n + 1,) and grid[-1] == 0
    assert torch.equal(grid[:-1], sch.sigmas[theirs.timesteps])


def test_sigmas_for_timesteps_and_bad_input():
    sch = DiscreteSchedule(alphas_cumprod("linear"))
    grid = sch.sigmas_for_timesteps(torch.arange(999, -1, -1))
    assert grid.shape == (1001,) and grid[-1] == 0
    assert torch.equal(grid[:-1], sch.sigmas.flip(0))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        sch.sigmas_for_timesteps([1000, 5])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        sch.sigmas_for_timesteps([])
    with pytest.raises(ValueError, match="strictly decreasing"):
        sch.sigmas_for_timesteps([5, 10])
    for bad in (0, 1001, 2.0):
        with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 1000\]"):
            sch.ddim_timesteps(bad)


@pytest.mark.parametrize("ac, message", [
    (torch.tensor([0.9, 0.95, 0.5]), "strictly decreasing"),
    (torch.tensor([1.0, 0.5]), r"values in \(0, 1\)"),
    (torch.tensor([0.5, 0.0]), r"values in \(0, 1\)"),
    (torch.tensor([0.5]), "1-D tensor"),
])
def test_discrete_schedule_rejects(ac, message):
    with pytest.raises(ValueError, match=message):
        DiscreteSchedule(ac)


def test_lognormal_sigma_density():
    s = sample_lognormal_sigma(100_000, p_mean=-1.2, p_std=1.2, generator=torch.Generator().manual_seed(0))
    assert s.shape == (100_000,) and (s > 0).all()
    log_s = s.double().log()
    assert abs(log_s.mean().item() + 1.2) < 5 * 1.2 / math.sqrt(1e5)
    assert abs(log_s.std().item() - 1.2) < 0.02
    again = sample_lognormal_sigma(100_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, again)
