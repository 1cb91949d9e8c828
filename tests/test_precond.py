"""Tests for fewstep_lab.precond: scalings against EDM table 1, the consistency boundary condition,
and the DDPM epsilon-network wrapper."""

import math

import pytest
import torch

from fewstep_lab.precond import (DiscreteEpsDenoiser, Precond, append_dims, as_sigma, consistency_scalings,
                                 edm_scalings, eps_scalings, get_scalings)
from fewstep_lab.schedules import alphas_cumprod
from helpers import DT, RandomNet

torch.set_num_threads(1)
SHAPES = [(5, 2), (3, 2, 4, 4), (4, 7), (2, 3, 5)]


def test_as_sigma_and_append_dims():
    x = torch.zeros(4, 3, 2, dtype=DT)
    assert as_sigma(0.1, x).shape == (4,) and as_sigma(0.1, x).dtype == DT
    assert as_sigma(0.1, x)[0].item() == 0.1  # a python float keeps its float64 value
    assert as_sigma(torch.tensor(2.0), x.float()).dtype == torch.float32
    assert torch.equal(as_sigma(torch.arange(4.0), x), torch.arange(4.0, dtype=DT))
    with pytest.raises(ValueError, match=r"shape \(batch,\) = \(4,\)"):
        as_sigma(torch.ones(3), x)
    assert append_dims(torch.ones(4), 4).shape == (4, 1, 1, 1)


def test_edm_scalings_closed_form():
    sigma_data = 0.7
    sigma = torch.logspace(-3, 2, 40, dtype=DT)
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sigma_data)
    for s, a, b, c, d in zip(sigma.tolist(), c_skip, c_out, c_in, c_noise):
        denom = s * s + sigma_data * sigma_data
        assert math.isclose(a.item(), sigma_data**2 / denom, rel_tol=1e-13)
        assert math.isclose(b.item(), s * sigma_data / math.sqrt(denom), rel_tol=1e-13)
        assert math.isclose(c.item(), 1 / math.sqrt(denom), rel_tol=1e-13)
        assert math.isclose(d.item(), 0.25 * math.log(s), rel_tol=1e-13, abs_tol=1e-15)
    # EDM's design goals: unit-variance network input and training target.
    torch.testing.assert_close(c_in**2 * (sigma_data**2 + sigma**2), torch.ones_like(sigma))
    # Var[(x0 - c_skip x) / c_out] = 1 for Var[x0] = sigma_data^2 and x = x0 + sigma n.
    target_var = ((1 - c_skip) ** 2 * sigma_data**2 + c_skip**2 * sigma**2) / c_out**2
    torch.testing.assert_close(target_var, torch.ones_like(sigma))
    assert [c.shape for c in edm_scalings(sigma)] == [(40,)] * 4


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_consistency_scalings_boundary(dtype):
    for sigma_min, kw in [(0.002, {}), (0.01, {"sigma_min": 0.01, "sigma_data": 1.3})]:
        sigma = torch.full((6,), sigma_min, dtype=dtype)
        c_skip, c_out, c_in, c_noise = consistency_scalings(sigma, **kw)
        assert torch.equal(c_skip, torch.ones_like(sigma))
        assert torch.equal(c_out, torch.zeros_like(sigma))
        assert (c_in > 0).all() and torch.isfinite(c_noise).all()
    # Away from sigma_min: Song et al. 2023, appendix C.
    sigma = torch.tensor([0.5, 3.0, 80.0], dtype=DT)
    c_skip, c_out, c_in, _ = consistency_scalings(sigma, sigma_data=0.5, sigma_min=0.002)
    torch.testing.assert_close(c_skip, 0.25 / ((sigma - 0.002) ** 2 + 0.25))
    torch.testing.assert_close(c_out, (sigma - 0.002) * 0.5 / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma**2 + 0.25).sqrt())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_consistency_precond_returns_x_at_sigma_min(shape, dtype):
    f = Precond(RandomNet(shape[1:], seed=len(shape), dtype=dtype), consistency_scalings)
    x = 3 * torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(f(x, 0.002), x)
        assert torch.equal(f(x, torch.full((shape[0],), 0.002, dtype=dtype)), x)
        # ... and not elsewhere: the network does contribute.
        assert not torch.allclose(f(x, 0.5), x)
    for sigma_min in (0.01, 0.05, 0.123):
        for sigma_data in (0.37, 1.3):
            g = Precond(RandomNet(shape[1:], dtype=dtype),
                        get_scalings("consistency", sigma_min=sigma_min, sigma_data=sigma_data))
            with torch.no_grad():
                assert torch.equal(g(x, sigma_min), x), (sigma_min, sigma_data)


class Recorder(torch.nn.Module):
    """F that returns a fixed random tensor and remembers its inputs."""

    def __init__(self, out):
        super().__init__()
        self.out, self.calls = out, []

    def forward(self, x_in, c_noise, cond=None):
        self.calls.append((x_in.clone(), c_noise.clone(), cond))
        return self.out


@pytest.mark.parametrize("name", ["edm", "eps", "consistency"])
def test_precond_is_eq7(name):
    x = torch.randn(4, 3, 2, dtype=DT)
    out = torch.randn(4, 3, 2, dtype=DT)
    sigma = torch.tensor([0.01, 0.3, 2.0, 50.0], dtype=DT)
    net = Recorder(out)
    scalings = get_scalings(name)
    D = Precond(net, scalings)(x, sigma, cond="label")
    c_skip, c_out, c_in, c_noise = scalings(sigma)
    x_in, c_noise_seen, cond = net.calls[0]
    torch.testing.assert_close(x_in, c_in[:, None, None] * x, rtol=1e-15, atol=0)
    torch.testing.assert_close(c_noise_seen, c_noise, rtol=0, atol=0)
    assert c_noise_seen.shape == (4,) and cond == "label"
    torch.testing.assert_close(D, c_skip[:, None, None] * x + c_out[:, None, None] * out, rtol=1e-15, atol=0)


def test_eps_scalings_are_x_minus_sigma_eps():
    x, eps = torch.randn(2, 5, 3, dtype=DT)
    sigma = torch.tensor([0.1, 1.0, 3.0, 10.0, 100.0], dtype=DT)
    net = Recorder(eps)
    D = Precond(net, eps_scalings)(x, sigma)
    torch.testing.assert_close(D, x - sigma[:, None] * eps, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(net.calls[0][0], x / (1 + sigma[:, None] ** 2).sqrt(), rtol=1e-14, atol=0)


def test_precond_scalar_sigma_broadcasts():
    D = Precond(RandomNet((2,)), edm_scalings)
    x = torch.randn(6, 2, dtype=DT)
    with torch.no_grad():
        assert torch.equal(D(x, 0.7), D(x, torch.full((6,), 0.7, dtype=DT)))
        assert torch.equal(D(x, torch.tensor(0.7, dtype=DT)), D(x, 0.7))


def test_get_scalings():
    assert get_scalings("edm") is edm_scalings
    s = torch.tensor([1.0], dtype=DT)
    torch.testing.assert_close(get_scalings("edm", sigma_data=1.0)(s)[0], torch.tensor([0.5], dtype=DT))
    with pytest.raises(ValueError, match=r"unknown scalings 'v'; choose one of \['consistency', 'edm', 'eps', 'lcm'\]"):
        get_scalings("v")


class EpsRecorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x_vp, t, cond=None):
        self.calls.append((x_vp.clone(), t.clone(), cond))
        return torch.sin(x_vp + t[:, None] / 100)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_discrete_eps_denoiser_on_integer_timesteps(kind):
    ac = alphas_cumprod(kind)
    eps_model = EpsRecorder()
    D = DiscreteEpsDenoiser(eps_model, ac)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    sigma = ((1 - ac[t]) / ac[t]).sqrt()  # the table's own noise levels, computed here
    x = torch.randn(6, 3, dtype=DT)
    out = D(x, sigma)
    x_vp, t_seen, _ = eps_model.calls[0]
    assert t_seen.dtype == DT and torch.equal(t_seen, t.to(DT))  # exactly those integers
    torch.testing.assert_close(x_vp, x / (1 + sigma[:, None] ** 2).sqrt(), rtol=1e-15, atol=0)
    torch.testing.assert_close(x_vp, x * ac[t, None].sqrt(), rtol=1e-12, atol=0)
    eps = torch.sin(x_vp + t_seen[:, None] / 100)
    torch.testing.assert_close(out, x - sigma[:, None] * eps, rtol=1e-15, atol=1e-15)
    assert D.sigma_min == sigma[0].item() and D.sigma_max == sigma[-1].item()
    # A python float sigma on the grid also lands exactly on its integer timestep.
    D(x, sigma[3].item())
    assert torch.equal(eps_model.calls[-1][1], torch.full((6,), 500.0, dtype=DT))


def test_discrete_eps_denoiser_off_grid_and_quantize():
    ac = alphas_cumprod("linear")
    sig = ((1 - ac) / ac).sqrt()
    mid = (sig[10] * sig[11]).sqrt()  # halfway in log sigma between t = 10 and 11
    x = torch.randn(2, 3, dtype=DT)
    eps_model = EpsRecorder()
    DiscreteEpsDenoiser(eps_model, ac)(x, mid)
    torch.testing.assert_close(eps_model.calls[0][1], torch.full((2,), 10.5, dtype=DT), rtol=0, atol=1e-12)
    near = sig[10] * 1.01
    DiscreteEpsDenoiser(eps_model, ac, quantize=True)(x, near)
    assert torch.equal(eps_model.calls[1][1], torch.full((2,), 10.0, dtype=DT))
    DiscreteEpsDenoiser(eps_model, ac)(x, near, "c")
    assert eps_model.calls[2][2] == "c"
