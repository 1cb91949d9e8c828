"""Shared test utilities: small random networks, the exact PF-ODE map of Gaussian data, and
moment checks measured in standard errors."""

import math

import torch
from torch import nn

DT = torch.float64


class EpsMLP(nn.Module):
    """A random epsilon-network eps_model(x_vp, t) on flat data, t used as a float input."""

    def __init__(self, dim: int = 2, hidden: int = 32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(dim + 2, hidden), nn.SiLU(), nn.Linear(hidden, dim)).to(DT)

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        # t / 1000 and a sine of t: the output depends visibly on the exact timestep.
        feats = torch.cat([x, (t / 1000)[:, None], torch.sin(t / 37)[:, None]], 1)
        return self.net(feats)


class EpsConv(nn.Module):
    """A random epsilon-network on (B, C, H, W) images, t added as a per-channel bias."""

    def __init__(self, channels: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1).to(DT)
        self.t_scale = nn.Parameter(torch.randn(channels, dtype=DT))

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        return torch.tanh(self.conv(x)) + self.t_scale[None, :, None, None] * torch.cos(t / 91)[:, None, None, None]


class RandomNet(nn.Module):
    """A diffusion-agnostic random network F(x_in, c_noise, cond) for any sample shape."""

    def __init__(self, shape, seed: int = 0, dtype=DT):
        super().__init__()
        torch.manual_seed(seed)
        n = math.prod(shape)
        self.lin = nn.Linear(n + 1, n).to(dtype)
        self.shape = tuple(shape)

    def forward(self, x_in, c_noise, cond=None):
        flat = torch.cat([x_in.reshape(x_in.shape[0], -1), c_noise[:, None].to(x_in.dtype)], 1)
        return (10 * torch.sin(self.lin(flat))).reshape((-1,) + self.shape)


def gaussian_flow(x, mu, std, sigma_from, sigma_to):
    """Exact PF-ODE map for isotropic Gaussian data N(mu, std^2 I): rescale around the mean."""
    return (x - mu) * math.sqrt(std**2 + sigma_to**2) / math.sqrt(std**2 + sigma_from**2) + mu


def assert_moments(x, mean, cov, n_se: float = 5.0):
    """Sample mean and covariance of x (N, d) agree with the truth within n_se standard errors."""
    x = x.to(DT)
    mean, cov = mean.to(DT), cov.to(DT)
    n = x.shape[0]
    m = x.mean(0)
    se_mean = x.std(0) / math.sqrt(n)
    assert ((m - mean).abs() <= n_se * se_mean).all(), f"mean {m.tolist()} vs {mean.tolist()} (se {se_mean.tolist()})"
    xc = x - mean
    prods = xc[:, :, None] * xc[:, None, :]  # (N, d, d): unbiased for cov with the true mean
    c = prods.mean(0)
    se_cov = prods.std(0) / math.sqrt(n)
    assert ((c - cov).abs() <= n_se * se_cov).all(), f"cov {c.tolist()} vs {cov.tolist()} (se {se_cov.tolist()})"
