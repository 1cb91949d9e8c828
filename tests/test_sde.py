"""Tests for fewstep_lab.sde against closed forms: Gaussian data has an exact denoiser, score,
marginal and PF-ODE flow map, so the SDEs and the likelihood can be checked without training."""

import dataclasses
import math

import pytest
import torch
from torch.distributions import MultivariateNormal
from torchdiffeq import odeint

from fewstep_lab.sde import (VESDE, VPSDE, bits_per_dim, log_likelihood, pf_ode_drift,
                             reverse_sde_drift)

torch.set_num_threads(1)
DT = torch.float64
MU = torch.tensor([0.5, -1.0], dtype=DT)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=DT)  # full covariance: non-diagonal Jacobian


def gaussian_denoiser(mu, cov):
    """Exact D(x, sigma) = mu + cov (cov + sigma^2 I)^-1 (x - mu) for data N(mu, cov)."""
    eye = torch.eye(len(mu), dtype=DT)

    def D(x, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])
        A = torch.linalg.solve(cov + sigma[:, None, None] ** 2 * eye, cov)  # symmetric pair
        m = mu if cond is None else mu + cond
        return m + ((x - m)[:, None, :] @ A).squeeze(1)

    return D


def gaussian_logp(x, mu, cov, sigma):
    """Closed-form log N(x; mu, cov + sigma^2 I)."""
    return MultivariateNormal(mu, cov + sigma**2 * torch.eye(len(mu), dtype=DT)).log_prob(x)


def flow_map(x0, mu, cov, sigma_from, sigma_to):
    """Exact PF-ODE transport of Gaussian data: (cov + s_to^2)^(1/2) (cov + s_from^2)^(-1/2)."""
    lam, U = torch.linalg.eigh(cov)
    gain = torch.sqrt((lam + sigma_to**2) / (lam + sigma_from**2))
    return mu + (x0 - mu) @ U @ torch.diag(gain) @ U.T


SDES = [VPSDE(), VESDE()]


def test_vp_sigma_matches_edm_table1_and_std_over_scale():
    vp, t = VPSDE(beta_min=0.1, beta_max=20.0), torch.linspace(1e-4, 1, 50, dtype=DT)
    expected = torch.sqrt(torch.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1)
    torch.testing.assert_close(vp.sigma(t), expected)
    s, std = vp.marginal(t)
    torch.testing.assert_close(std / s, expected)
    torch.testing.assert_close(s**2 + std**2, torch.ones_like(t))  # variance preserving


@pytest.mark.parametrize("sde", SDES + [VPSDE(beta_min=1.0, beta_max=1.0)], ids=repr)
def test_t_of_sigma_inverts_sigma(sde):
    t = torch.linspace(1e-5, 1, 101, dtype=DT)
    torch.testing.assert_close(sde.t_of_sigma(sde.sigma(t)), t, rtol=1e-9, atol=1e-12)
    sigma = torch.logspace(-3, 1, 20, dtype=DT)
    sigma = sigma[sigma >= sde.sigma(torch.tensor(0.0, dtype=DT))]
    torch.testing.assert_close(sde.sigma(sde.t_of_sigma(sigma)), sigma)


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_marginal_solves_the_moment_odes_of_drift_and_diffusion(sde):
    # Linear drift f = a(t) x: dm/dt = a m, dv/dt = 2 a v + g^2 (Song et al. App. B).
    def rhs(t, mv):
        a = sde.drift(torch.ones(1, dtype=DT), t)[0]
        return torch.stack([a * mv[0], 2 * a * mv[1] + sde.diffusion(t) ** 2])

    v0 = 0.0 if isinstance(sde, VPSDE) else sde.sigma_min**2  # VE: x(0) = x0 + sigma_min eps
    t = torch.linspace(0, 1, 11, dtype=DT)
    mv = odeint(rhs, torch.tensor([1.0, v0], dtype=DT), t, rtol=1e-10, atol=1e-12)
    s, std = sde.marginal(t)
    torch.testing.assert_close(mv[:, 0], s, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(mv[:, 1], std**2, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_score_from_denoiser_matches_gaussian_marginal_score(sde):
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.01, 0.2, 0.5, 0.9], dtype=DT)
    s, std = sde.marginal(t)
    x = s[:, None] * MU + 3 * torch.randn(4, 2, generator=g, dtype=DT)
    score = sde.score_from_denoiser(gaussian_denoiser(MU, COV), x, t)
    cov_t = s[:, None, None] ** 2 * COV + std[:, None, None] ** 2 * torch.eye(2, dtype=DT)
    expected = -torch.linalg.solve(cov_t, (x - s[:, None] * MU)[..., None])[..., 0]
    torch.testing.assert_close(score, expected)


@pytest.mark.parametrize("sde", SDES, ids=repr)
@pytest.mark.parametrize("t", [0.05, 0.3, 0.8])
def test_sde_drifts_are_the_sigma_space_drifts_seen_through_s_and_sigma(sde, t):
    # x_t = s(t) x_sigma, so dx_t/dt = s'/s x_t + s sigma' dx_sigma/dsigma (EDM eq. 4 vs Song 13).
    tt = torch.tensor(t, dtype=DT, requires_grad=True)
    s, sigma = sde.marginal(tt)[0], sde.sigma(tt)
    ds, dsigma = (torch.autograd.grad(v, tt)[0] if v.requires_grad else 0.0 for v in (s, sigma))
    s, sigma = s.detach(), sigma.detach()
    D, x = gaussian_denoiser(MU, COV), torch.tensor([[0.3, 2.0], [-1.0, 0.1]], dtype=DT) * s
    ode = ds / s * x + s * dsigma * pf_ode_drift(D, x / s, sigma)
    rev = ds / s * x + s * dsigma * reverse_sde_drift(D, x / s, sigma)
    torch.testing.assert_close(sde.ode_drift(D, x, t), ode)
    torch.testing.assert_close(sde.reverse_drift(D, x, t), rev)


def test_reverse_sde_euler_maruyama_recovers_gaussian_data():
    g = torch.Generator().manual_seed(1)
    mu, var, n = torch.tensor([1.0], dtype=DT), torch.tensor([[0.25]], dtype=DT), 20000
    D, sigmas = gaussian_denoiser(mu, var), torch.logspace(1, -2, 400, dtype=DT)
    x = mu + math.sqrt(0.25 + 100.0) * torch.randn(n, 1, generator=g, dtype=DT)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        z = torch.randn(n, 1, generator=g, dtype=DT)
        x = (x + (sigma_next - sigma) * reverse_sde_drift(D, x, sigma)
             + torch.sqrt(sigma**2 - sigma_next**2) * z)
    assert abs(x.mean() - 1.0) < 0.02
    assert abs(x.var() - (0.25 + 1e-4)) < 0.02


def test_prior_sample_shapes_scales_and_seed():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ve = VESDE(sigma_min=0.01, sigma_max=50.0)
    a, b = ve.prior_sample((4000, 3), g1), ve.prior_sample((4000, 3), g2)
    assert a.shape == (4000, 3) and torch.equal(a, b)
    assert abs(a.std().item() - 50.0) < 1.5
    assert abs(VPSDE().prior_sample((4000, 3), g1).std().item() - 1.0) < 0.03


def test_sdes_are_frozen_and_validate_parameters():
    with pytest.raises(dataclasses.FrozenInstanceError):
        VPSDE().beta_max = 1.0
    with pytest.raises(ValueError, match="beta_min"):
        VPSDE(beta_min=5.0, beta_max=1.0)
    with pytest.raises(ValueError, match="sigma_min"):
        VESDE(sigma_min=1.0, sigma_max=0.5)


def test_log_likelihood_matches_gaussian_with_matched_prior():
    x0 = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-1.5, -2.5]], dtype=DT)
    lo, hi = 0.002, 80.0
    logp, nfe = log_likelihood(gaussian_denoiser(MU, COV), x0, sigma_min=lo, sigma_max=hi,
                               prior_logp=lambda x: gaussian_logp(x, MU, COV, hi))
    torch.testing.assert_close(logp, gaussian_logp(x0, MU, COV, lo), rtol=0, atol=1e-3)
    assert 10 < nfe < 1000


def test_log_likelihood_default_prior_transports_x_and_has_the_documented_bias():
    x0 = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=DT)
    D, lo, hi, seen = gaussian_denoiser(MU, COV), 0.002, 80.0, []
    exact, _ = log_likelihood(D, x0, prior_logp=lambda x: seen.append(x) or
                              gaussian_logp(x, MU, COV, hi))
    x_T = flow_map(x0, MU, COV, lo, hi)
    torch.testing.assert_close(seen[0], x_T, rtol=1e-4, atol=1e-4)
    default, _ = log_likelihood(D, x0)
    prior_default = MultivariateNormal(torch.zeros(2, dtype=DT), hi**2 * torch.eye(2, dtype=DT))
    bias = prior_default.log_prob(x_T) - gaussian_logp(x_T, MU, COV, hi)
    torch.testing.assert_close(default - exact, bias, rtol=1e-3, atol=1e-5)
    lam, U = torch.linalg.eigh(COV)  # the docstring's estimate, z = COV^(-1/2) (x0 - MU)
    z = (x0 - MU) @ U @ torch.diag(lam.rsqrt()) @ U.T
    approx = -z @ MU / hi - (MU @ MU + ((z @ COV) * z).sum(1) - COV.trace()) / (2 * hi**2)
    assert torch.all((bias - approx).abs() < 0.01 * bias.abs())


def test_hutchinson_is_unbiased_and_seeded():
    D, x0 = gaussian_denoiser(MU, COV), torch.tensor([[1.0, 0.5]], dtype=DT).expand(256, 2)
    exact, _ = log_likelihood(D, x0[:1], rtol=1e-6, atol=1e-6)
    kw = dict(divergence="hutchinson", rtol=1e-6, atol=1e-6)
    hutch, _ = log_likelihood(D, x0, generator=torch.Generator().manual_seed(0), **kw)
    assert hutch.std() > 1e-2  # the probes do vary (COV is not diagonal) ...
    assert abs(hutch.mean() - exact[0]) < 4 * hutch.std() / math.sqrt(len(hutch))  # ... unbiased
    many, _ = log_likelihood(D, x0[:4], num_probes=64, generator=torch.Generator().manual_seed(0),
                             **kw)
    assert many.std() < hutch.std() / 4  # averaging probes shrinks the spread
    again, _ = log_likelihood(D, x0[:4], num_probes=64,
                              generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(many, again, rtol=0, atol=0)


def test_log_likelihood_on_image_shapes_float32_with_cond():
    # Isotropic Gaussian images N(c, 0.3^2 I) with c = cond: Rademacher probes are exact here.
    g = torch.Generator().manual_seed(2)
    cond = torch.tensor([[0.5], [-0.5]]).view(2, 1, 1, 1)

    def D(x, sigma, cond=None):
        w = (0.09 / (0.09 + sigma**2)).view(-1, 1, 1, 1)
        return cond + w * (x - cond)

    x0 = cond + 0.3 * torch.randn(2, 1, 3, 3, generator=g)
    expected = torch.distributions.Normal(cond, math.sqrt(0.09 + 0.002**2)).log_prob(x0)
    for div in ("exact", "hutchinson"):
        logp, _ = log_likelihood(D, x0, cond=cond, divergence=div, generator=g,
                                 prior_logp=lambda x: torch.distributions.Normal(
                                     cond, math.sqrt(0.09 + 80.0**2)).log_prob(x).sum((1, 2, 3)))
        assert logp.dtype == torch.float32 and logp.shape == (2,)
        torch.testing.assert_close(logp, expected.sum((1, 2, 3)), rtol=0, atol=2e-3)


def test_nfe_is_the_number_of_denoiser_calls():
    calls, D = [0], gaussian_denoiser(MU, COV)

    def counted(x, sigma, cond=None):
        calls[0] += 1
        return D(x, sigma, cond)

    x0 = torch.zeros(2, 2, dtype=DT)
    _, nfe = log_likelihood(counted, x0)
    assert nfe == calls[0] > 0
    _, nfe = log_likelihood(counted, x0, method="rk4")  # one 3/8-rule step: four evaluations
    assert nfe == 4


def test_bits_per_dim_of_uniform_data_is_eight_bits():
    d = 12
    uniform_pm1 = torch.tensor([-d * math.log(2.0)])  # density 2^-d on [-1, 1]^d
    torch.testing.assert_close(bits_per_dim(uniform_pm1, d), torch.tensor([8.0]))
    torch.testing.assert_close(bits_per_dim(torch.zeros(1), d, data_range=1.0),
                               torch.tensor([8.0]))
    assert bits_per_dim(torch.zeros(1), d, num_bins=2)[0] == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma_min=1.0, sigma_max=1.0), "smaller than sigma_max"),
    (dict(sigma_min=0.0), "positive"),
    (dict(sigma_min=-0.1), "positive"),
    (dict(divergence="skilling"), "unknown divergence"),
    (dict(divergence="hutchinson", num_probes=0), "num_probes"),
    (dict(num_probes=8), "only applies"),
])
def test_log_likelihood_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        log_likelihood(gaussian_denoiser(MU, COV), torch.zeros(1, 2, dtype=DT), **kwargs)
