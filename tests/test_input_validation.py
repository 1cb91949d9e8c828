"""Library validation added for issue 8: samplers refuse non-finite x, exact mixture denoisers refuse a
cond, sigma grids refuse an infinite sigma_max and rho <= 0. Each check also keeps the valid path working."""

import math

import pytest
import torch

from fewstep_lab import sampling
from fewstep_lab.data.toy2d import checkerboard, eight_gaussians
from fewstep_lab.schedules import karras_sigmas, loglinear_sigmas

SAMPLERS = sorted(set(sampling.SAMPLERS) | {"ode_adaptive"})


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_samplers_refuse_non_finite_x_before_calling_the_denoiser(name, bad):
    calls = []

    def D(x, sigma, cond=None):
        calls.append(1)
        return torch.zeros_like(x)

    sigmas = karras_sigmas(3, sigma_min=0.002 if name != "consistency" else 0.5)
    x = torch.randn(8, 2) * sigmas[0]
    x[3, 1] = bad
    with pytest.raises(ValueError, match=r"x holds 1 NaN or inf value\(s\)"):
        sampling.get_sampler(name)(D, x, sigmas)
    assert calls == []  # refused up front, no network evaluation wasted
    x[3, 1] = 0.0
    out = sampling.get_sampler(name)(D, x, sigmas)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("make", [eight_gaussians, checkerboard])
def test_exact_denoisers_refuse_a_condition(make):
    data = make()
    x, sigma = torch.randn(5, 2), torch.full((5,), 0.3)
    with pytest.raises(ValueError, match=f"{type(data).__name__} is unconditional.*cond=None"):
        data.denoiser(x, sigma, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="unconditional"):
        sampling.sample_heun(data.denoiser, x * 80, karras_sigmas(2), cond=torch.zeros(5, dtype=torch.long))
    assert data.denoiser(x, sigma).shape == (5, 2) and data.denoiser(x, sigma, None).shape == (5, 2)


@pytest.mark.parametrize("grid", [karras_sigmas, loglinear_sigmas])
def test_grids_refuse_infinite_sigma(grid):
    with pytest.raises(ValueError, match="sigma_max < inf"):
        grid(5, sigma_max=math.inf)
    with pytest.raises(ValueError, match="sigma_max < inf"):
        grid(5, sigma_min=math.nan)
    assert torch.isfinite(grid(5)).all() and grid(5)[-1] == 0


@pytest.mark.parametrize("rho", [0.0, -7.0, math.inf, math.nan])
def test_karras_refuses_bad_rho(rho):
    with pytest.raises(ValueError, match="rho must be a positive finite number"):
        karras_sigmas(5, rho=rho)
    assert karras_sigmas(5, rho=0.5)[0] == pytest.approx(80.0)  # any positive rho is a valid grid
