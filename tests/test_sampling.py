"""Tests for fewstep_lab.sampling with exact denoisers: Gaussian data has a closed-form PF-ODE map,
so every sampler's output distribution and the convergence order of its steps can be checked
without training anything."""

import math

import pytest
import torch

from fewstep_lab.data.toy2d import GaussianMixture, gaussian, get_dataset
from fewstep_lab.sampling import (SAMPLERS, euler_step, get_sampler, heun_step, sample_ancestral,
                                  sample_consistency, sample_euler, sample_ode_adaptive, to_d)
from fewstep_lab.schedules import karras_sigmas
from helpers import DT, assert_moments, gaussian_flow

torch.set_num_threads(1)
MU = torch.tensor([0.3, -0.2], dtype=DT)
COV = torch.tensor([[0.25, 0.1], [0.1, 0.16]], dtype=DT)  # anisotropic: checks all of the covariance
EYE = torch.eye(2, dtype=DT)
TWO = GaussianMixture([[-0.6, 0.2], [0.5, -0.3]], [[[0.04, 0.01], [0.01, 0.02]], [[0.03, -0.015], [-0.015, 0.05]]],
                      weights=[0.3, 0.7], name="two")


def gaussian_D(x, sigma, cond=None):
    """Exact denoiser of N(MU, COV), written out here (fast: one 2x2 solve per call)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1)
    assert (sigma == sigma[0]).all()  # the samplers call D with one noise level per step
    A = torch.linalg.solve(COV + sigma[0] ** 2 * EYE, COV)  # symmetric; D = MU + (x - MU) A
    return MU + (x - MU) @ A


def _run(name, D, x, grid, **kw):
    out = get_sampler(name)(D, x, grid, **kw)
    return out[0] if name == "ode_adaptive" else out


# ------------------------------------------------------------------ distributions


# (sampler, steps, extra kwargs): steps chosen so that the discretisation bias of the variance stays
# below ~2.5% (first-order methods converge slowly on the rho = 7 grid; see the order tests).
REACH = [
    ("euler", 512, {}),
    ("heun", 64, {}),
    ("ancestral", 512, {}),
    ("dpm_solver_2", 32, {}),
    ("dpmpp_2m", 64, {}),
    ("euler_maruyama", 512, {}),
    ("ode_adaptive", 2, {"rtol": 1e-5, "atol": 1e-5}),
]


@pytest.mark.parametrize("name, steps, kw", REACH, ids=[r[0] for r in REACH])
def test_sampler_reaches_gaussian(name, steps, kw):
    """Mean and full covariance of 20k samples within 5 standard errors of N(MU, COV)."""
    grid = karras_sigmas(steps)
    g = torch.Generator().manual_seed(0)
    # Start from the exact noisy marginal N(MU, COV + sigma_max^2 I), so only the sampler is tested.
    L = torch.linalg.cholesky(COV + grid[0].item() ** 2 * EYE)
    x = MU + torch.randn(20_000, 2, generator=g, dtype=DT) @ L.T
    assert_moments(_run(name, gaussian_D, x, grid, generator=g, **kw), MU, COV, n_se=5)


MIX = [("euler", 64), ("heun", 32), ("ancestral", 64), ("dpm_solver_2", 32), ("dpmpp_2m", 64),
       ("euler_maruyama", 64), ("ode_adaptive", 2)]


@pytest.mark.parametrize("name, steps", MIX, ids=[m[0] for m in MIX])
def test_sampler_mode_weights(name, steps):
    """Exact mixture denoisers: 8gaussians puts ~1/8 of the samples on each mode, and a 0.3/0.7
    two-component mixture gets its weights and overall mean right; samples land on the modes."""
    kw = {"rtol": 1e-3, "atol": 1e-3} if name == "ode_adaptive" else {}
    grid = karras_sigmas(steps)
    for gm, n in [(get_dataset("8gaussians"), 3000), (TWO, 4000)]:
        g = torch.Generator().manual_seed(1)
        out = _run(name, gm, grid[0].item() * torch.randn(n, 2, generator=g, dtype=DT), grid, generator=g, **kw)
        frac = torch.bincount(gm.assign(out), minlength=len(gm.weights)).to(DT) / n
        se = (gm.weights * (1 - gm.weights) / n).sqrt()
        assert ((frac - gm.weights).abs() < 5 * se).all(), (gm.name, frac.tolist())
        mean, _ = gm.mean_and_cov()
        assert ((out.mean(0) - mean).abs() < 5 * out.std(0) / math.sqrt(n)).all()
        # Sharp modes: nearly every sample within 4 component standard deviations of a mean.
        dist = (out[:, None, :] - gm.means[None]).norm(dim=-1).min(1).values
        assert (dist < 4 * gm.covs[:, 0, 0].max().sqrt()).to(DT).mean() > 0.99


def test_consistency_sampler_with_exact_consistency_function():
    """f(x, sigma) = the PF-ODE map to sigma_min; one step and multistep both give p_{sigma_min} exactly."""
    sigma_min = 0.002

    def f(x, sigma, cond=None):
        return gaussian_flow(x, MU, 0.5, float(sigma.reshape(-1)[0]), sigma_min)

    for grid in [torch.tensor([80.0, 0.0]), torch.tensor([80.0, 1.0, 0.3, 0.0])]:
        g = torch.Generator().manual_seed(2)
        x = grid[0].item() * torch.randn(20_000, 2, generator=g, dtype=DT)
        out = sample_consistency(f, x, grid, generator=g, sigma_min=sigma_min)
        assert_moments(out, MU, (0.25 + sigma_min**2) * EYE)
    # Projection (Algorithm 4): applied after every step.
    out = sample_consistency(f, torch.randn(10, 2, dtype=DT), torch.tensor([80.0, 1.0, 0.0]),
                             project=lambda x: x.clamp(min=0))
    assert (out >= 0).all()
    with pytest.raises(ValueError, match="must be >= sigma_min=0.002"):
        sample_consistency(f, torch.randn(3, 2, dtype=DT), torch.tensor([1.0, 0.001, 0.0]))


# ------------------------------------------------------------------ convergence orders


def _order(errs):
    return [math.log2(a / b) for a, b in zip(errs, errs[1:])]


@pytest.mark.parametrize("step, order", [(euler_step, 1), (heun_step, 2)])
def test_step_convergence_order(step, order):
    """Endpoint error from sigma = 80 to 0.05 on a Karras grid without the final 0: n and 2n steps."""
    gm = gaussian(mean=(0.3, -0.2), std=0.5)
    x_T = 80 * torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=DT)
    errs = []
    for n in (32, 64, 128):
        grid = karras_sigmas(n, sigma_min=0.05).to(DT)[:-1]
        x = x_T
        for s, s_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
            x, _ = step(gm, x, s, s_next)
        exact = gaussian_flow(x_T, MU, 0.5, grid[0].item(), grid[-1].item())
        errs.append((x - exact).abs().max().item())
    assert all(abs(p - order) < 0.15 for p in _order(errs)), _order(errs)


@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpm_solver_2", 2), ("dpmpp_2m", 2)])
def test_sampler_convergence_order(name, order):
    """Whole samplers down to 0 (the last Euler step from sigma_min = 0.002 costs ~1e-5 here)."""
    gm = gaussian(mean=(0.3, -0.2), std=0.5)
    x_T = 80 * torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=DT)
    errs = []
    for n in (32, 64, 128):
        grid = karras_sigmas(n)
        exact = gaussian_flow(x_T, MU, 0.5, grid[0].item(), 0.0)
        errs.append((get_sampler(name)(gm, x_T, grid) - exact).abs().max().item())
    assert all(abs(p - order) < 0.2 for p in _order(errs)), _order(errs)


def test_euler_and_heun_steps_closed_form():
    """One step by hand: Euler x + (s' - s) (x - D) / s; Heun averages the slopes at both ends."""
    x = torch.randn(5, 2, dtype=DT)
    s, sn = 2.0, 1.2
    d = (x - gaussian_D(x, s)) / s
    torch.testing.assert_close(to_d(x, s, gaussian_D(x, s)), d, rtol=1e-14, atol=0)
    x_e, den = euler_step(gaussian_D, x, s, sn)
    torch.testing.assert_close(x_e, x + (sn - s) * d, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(den, gaussian_D(x, s), rtol=0, atol=0)
    d2 = (x_e - gaussian_D(x_e, sn)) / sn
    x_h, _ = heun_step(gaussian_D, x, s, sn)
    torch.testing.assert_close(x_h, x + (sn - s) * (d + d2) / 2, rtol=1e-14, atol=1e-14)
    # To 0 Heun is plain Euler, i.e. the denoised estimate.
    torch.testing.assert_close(heun_step(gaussian_D, x, s, 0.0)[0], gaussian_D(x, s), rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="all zero or all positive"):
        heun_step(gaussian_D, x, s, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0], dtype=DT))


# ------------------------------------------------------------------ determinism, nfe, callback


@pytest.mark.parametrize("name", ["ancestral", "euler_maruyama", "consistency"])
def test_stochastic_samplers_reproducible(name):
    grid = karras_sigmas(6)
    x = grid[0].item() * torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    D = get_dataset("8gaussians")

    def run(seed):
        return get_sampler(name)(D, x, grid, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_solver_2", "dpmpp_2m"])
def test_deterministic_samplers_ignore_generator(name):
    grid = karras_sigmas(5)
    x = grid[0].item() * torch.randn(20, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    a = get_sampler(name)(gaussian_D, x, grid, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, get_sampler(name)(gaussian_D, x, grid, generator=torch.Generator().manual_seed(2)))


def test_ancestral_eta_zero_is_euler():
    grid = karras_sigmas(10)
    x = grid[0].item() * torch.randn(20, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    torch.testing.assert_close(sample_ancestral(gaussian_D, x, grid, eta=0.0), sample_euler(gaussian_D, x, grid),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sample_ancestral(gaussian_D, x, grid, eta=-1.0)


def test_ode_adaptive_nfe_and_accuracy():
    grid = karras_sigmas(3)
    x_T = 80 * torch.randn(64, 2, generator=torch.Generator().manual_seed(5), dtype=DT)
    exact = gaussian_flow(x_T, MU, 0.5, grid[0].item(), 0.0)
    gm = gaussian(mean=(0.3, -0.2), std=0.5)
    results = {}
    for rtol in (1e-2, 1e-4, 1e-7):
        seen = []
        x, nfe = sample_ode_adaptive(gm, x_T, grid, rtol=rtol, atol=rtol, callback=seen.append)
        assert isinstance(nfe, int) and nfe > 0
        assert [c["i"] for c in seen] == [0, 1, 2] and seen[-1]["sigma_next"] == 0.0
        results[rtol] = (nfe, (x - exact).abs().max().item())
    nfes = [results[r][0] for r in (1e-2, 1e-4, 1e-7)]
    assert nfes[0] < nfes[1] < nfes[2], nfes
    assert results[1e-7][1] < 1e-4 < results[1e-2][1], results


def test_callback_sees_every_step():
    grid = karras_sigmas(7)
    x = grid[0].item() * torch.randn(4, 2, dtype=DT)
    for name in ["euler", "heun", "ancestral", "dpm_solver_2", "dpmpp_2m", "euler_maruyama"]:
        seen = []
        out = get_sampler(name)(gaussian_D, x, grid, callback=seen.append)
        assert [c["i"] for c in seen] == list(range(7))
        assert [c["sigma"] for c in seen] == pytest.approx(grid[:-1].tolist())
        assert [c["sigma_next"] for c in seen] == pytest.approx(grid[1:].tolist())
        assert torch.equal(seen[-1]["x"], out)
        assert seen[0]["denoised"].shape == x.shape


def test_cond_reaches_the_denoiser():
    seen = set()

    def D(x, sigma, cond=None):
        seen.add(cond)
        assert sigma.shape == (x.shape[0],)
        return gaussian_D(x, sigma) + (0 if cond is None else cond)

    grid = karras_sigmas(4)
    x = grid[0].item() * torch.randn(8, 2, dtype=DT)
    for name in sorted(SAMPLERS) + ["ode_adaptive"]:
        seen.clear()
        out = _run(name, D, x, grid, cond=1.5)
        assert seen == {1.5}, name
        assert out.mean().item() > 1.0  # the shift of the data mean by cond shows in the samples


# ------------------------------------------------------------------ bad input


ALL = sorted(SAMPLERS) + ["ode_adaptive"]


def test_get_sampler():
    for name in ALL:
        assert callable(get_sampler(name))
    assert get_sampler("ddim") is sample_euler and get_sampler("ode_adaptive") is sample_ode_adaptive
    with pytest.raises(ValueError, match=r"unknown sampler 'dpm\+\+'; choose one of \['ancestral'"):
        get_sampler("dpm++")


@pytest.mark.parametrize("name", ALL)
def test_bad_denoiser_and_grids(name):
    sampler = get_sampler(name)
    x = torch.randn(4, 2, dtype=DT)
    with pytest.raises(ValueError, match=r"denoiser returned shape \(4, 3\) for input shape \(4, 2\)"):
        sampler(lambda x, s, c=None: torch.zeros(4, 3, dtype=DT), x, karras_sigmas(3))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sampler(gaussian_D, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="end in 0"):
        sampler(gaussian_D, x, torch.tensor([2.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="NaN"):
        sampler(gaussian_D, x, torch.tensor([2.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(batch, ...\)"):
        sampler(gaussian_D, torch.zeros(0, 2), karras_sigmas(3))
