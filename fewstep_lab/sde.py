"""SDE view of diffusion: VP/VE SDEs, reverse SDE, probability-flow ODE and exact likelihood.

Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential Equations":
forward SDE dx = f(x, t) dt + g(t) dw (eq. 5), reverse SDE dx = [f - g^2 score] dt + g dw_bar
(eq. 6), probability-flow ODE dx/dt = f - g^2 score / 2 (eq. 13), the VE and VP SDEs (eq. 9 and
11) and the likelihood by the instantaneous change of variables (appendix D.2). Everything is
tied to the course's sigma-space through Karras et al. 2022 ("EDM", eq. 1-4 and table 1): an
SDE with marginal x_t = s(t) * (x0 + sigma(t) * eps) is the sigma-space process x0 + sigma * eps
seen through the scale s(t), so a sigma-space denoiser D gives the score of every SDE.
"""

import math
from dataclasses import dataclass

import torch
from torchdiffeq import odeint

__all__ = ["VPSDE", "VESDE", "pf_ode_drift", "reverse_sde_drift", "log_likelihood",
           "bits_per_dim"]


def _as_batch(v, x):
    """A python float, 0-d or (B,) tensor as a (B,) tensor on x's device and dtype."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.expand(x.shape[0]) if v.ndim == 0 else v


def _bcast(v, x):
    """Reshape a (B,) or 0-d tensor to broadcast against x of shape (B, ...)."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v


def _t(t):  # without an x to take the dtype from, a python float becomes the default dtype
    return torch.as_tensor(t, dtype=torch.get_default_dtype()) if not torch.is_tensor(t) else t


class _SDE:
    """What a SDE gives once drift, diffusion and marginal are known (shared by VP and VE)."""

    def sigma(self, t):
        """Sigma-space noise level sigma(t) = std(t) / s(t) (EDM eq. 4)."""
        s, std = self.marginal(t)
        return std / s

    def score_from_denoiser(self, D, x, t, cond=None):
        """Score of p_t at x from a sigma-space denoiser: (s*D(x/s, sigma) - x) / (s*sigma)^2."""
        s, std = (_bcast(v, x) for v in self.marginal(_as_batch(t, x)))
        sigma = std / s
        x0_hat = D(x / s, sigma.flatten(), cond=cond)
        return (s * x0_hat - x) / std**2

    def reverse_drift(self, D, x, t, cond=None):
        """Drift of the reverse-time SDE f - g^2 * score (Song et al. 2021, eq. 6)."""
        g = _bcast(self.diffusion(_as_batch(t, x)), x)
        return self.drift(x, t) - g**2 * self.score_from_denoiser(D, x, t, cond)

    def ode_drift(self, D, x, t, cond=None):
        """Drift of the probability-flow ODE f - g^2 * score / 2 (Song et al. 2021, eq. 13)."""
        g = _bcast(self.diffusion(_as_batch(t, x)), x)
        return self.drift(x, t) - 0.5 * g**2 * self.score_from_denoiser(D, x, t, cond)

    def _prior(self, shape, generator, std):
        device = generator.device if generator is not None else None
        return std * torch.randn(shape, generator=generator, device=device)


@dataclass(frozen=True)
class VPSDE(_SDE):
    """Variance-preserving SDE dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw (Song et al. eq. 11).

    beta(t) = beta_min + t * (beta_max - beta_min) on t in [0, 1], so x_t = s(t) x0 + std(t) eps
    with s = exp(-B(t)/2), std^2 = 1 - s^2 and B(t) = int_0^t beta; in sigma-space
    sigma(t) = sqrt(exp(B(t)) - 1) (EDM table 1, "VP"). This is the continuous-time limit of
    DDPM; the discrete alphas_cumprod live in fewstep_lab.schedules.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self):
        if not 0 < self.beta_min <= self.beta_max:
            raise ValueError(f"VPSDE needs 0 < beta_min <= beta_max, got beta_min={self.beta_min}, "
                             f"beta_max={self.beta_max}")

    def _B(self, t):  # integrated noise rate int_0^t beta(u) du
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def drift(self, x, t):
        """Forward drift f(x, t) = -beta(t) x / 2 (eq. 11); t float, 0-d or (B,)."""
        beta = self.beta_min + _as_batch(t, x) * (self.beta_max - self.beta_min)
        return -0.5 * _bcast(beta, x) * x

    def diffusion(self, t):
        """Forward diffusion coefficient g(t) = sqrt(beta(t)) (eq. 11)."""
        return torch.sqrt(self.beta_min + _t(t) * (self.beta_max - self.beta_min))

    def marginal(self, t):
        """Scale and std of p_t(x_t | x0): (exp(-B/2), sqrt(1 - exp(-B))) (Song et al. App. B)."""
        B = self._B(_t(t))
        return torch.exp(-0.5 * B), torch.sqrt(-torch.expm1(-B))

    def sigma(self, t):
        """Sigma-space noise level sqrt(exp(B(t)) - 1) (EDM table 1), stable for small t."""
        return torch.sqrt(torch.expm1(self._B(_t(t))))

    def t_of_sigma(self, sigma):
        """Inverse of sigma(t): solve B(t) = log(1 + sigma^2), a quadratic in t."""
        L = torch.log1p(_t(sigma) ** 2)
        d = self.beta_max - self.beta_min
        if d == 0:
            return L / self.beta_min
        # Root written as 2L / (b + sqrt(b^2 + 2dL)) to avoid cancellation when L is small.
        return 2 * L / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * L))

    def prior_sample(self, shape, generator=None):
        """Sample the prior N(0, I) that p_1 approaches (s(1)^2 = exp(-B(1)) is about 4e-5)."""
        return self._prior(shape, generator, 1.0)


@dataclass(frozen=True)
class VESDE(_SDE):
    """Variance-exploding SDE dx = sqrt(d[sigma^2]/dt) dw (Song et al. eq. 9).

    sigma(t) = sigma_min * (sigma_max / sigma_min)^t, s(t) = 1. Following Song et al., the
    marginal is x_t = x0 + sigma(t) eps with std sigma(t); the SDE started from clean x0 at t=0
    would give std sqrt(sigma(t)^2 - sigma_min^2), so read x(0) as x0 + sigma_min * eps.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"VESDE needs 0 < sigma_min < sigma_max, got sigma_min="
                             f"{self.sigma_min}, sigma_max={self.sigma_max}")

    def drift(self, x, t):
        """Forward drift f = 0 (eq. 9)."""
        return torch.zeros_like(x)

    def diffusion(self, t):
        """g(t) = sqrt(d[sigma^2]/dt) = sigma(t) * sqrt(2 log(sigma_max / sigma_min)) (eq. 9)."""
        return self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))

    def marginal(self, t):
        """Scale and std of p_t(x_t | x0): (1, sigma(t))."""
        sigma = self.sigma(t)
        return torch.ones_like(sigma), sigma

    def sigma(self, t):
        """Geometric noise level sigma_min * (sigma_max / sigma_min)^t."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** _t(t)

    def t_of_sigma(self, sigma):
        """Inverse of sigma(t): log(sigma / sigma_min) / log(sigma_max / sigma_min)."""
        return torch.log(_t(sigma) / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def prior_sample(self, shape, generator=None):
        """Sample the prior N(0, sigma_max^2 I) (the data variance is neglected)."""
        return self._prior(shape, generator, self.sigma_max)


def pf_ode_drift(D, x, sigma, cond=None):
    """Probability-flow ODE in sigma-space dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 3)."""
    sigma = _as_batch(sigma, x)
    return (x - D(x, sigma, cond=cond)) / _bcast(sigma, x)


def reverse_sde_drift(D, x, sigma, cond=None):
    """Reverse SDE (Song eq. 6) in sigma-space: dx = 2 (x - D) / sigma dsigma + sqrt(2 sigma) dw.

    With sigma(t) = t the VE diffusion is g^2 = d[sigma^2]/dsigma = 2 sigma and the score is
    (D - x) / sigma^2, so the drift is twice the PF-ODE drift; an Euler-Maruyama step from sigma
    down to sigma_next adds fresh noise of variance sigma^2 - sigma_next^2.
    """
    return 2 * pf_ode_drift(D, x, sigma, cond)


def _gaussian_logp(x, std):
    """log N(x; 0, std^2 I) summed over all but the batch dimension."""
    n = x[0].numel()
    return -0.5 * (x.flatten(1) ** 2).sum(1) / std**2 - 0.5 * n * math.log(2 * math.pi * std**2)


def log_likelihood(D, x0, *, sigma_min=0.002, sigma_max=80.0, cond=None, divergence="exact",
                   num_probes=1, rtol=1e-5, atol=1e-5, method="dopri5", generator=None,
                   prior_logp=None):
    """log p_{sigma_min}(x0) by the PF-ODE and instantaneous change of variables (Song App. D.2).

    x0: (B, ...). Returns (logp of shape (B,) in nats, nfe = number of calls to D). logp is the
    density of x0 + sigma_min * eps at x0. The ODE is integrated in u = log(sigma), where
    dx/du = x - D(x, e^u) stays of the size of x and the steps spread over all noise scales
    (in sigma itself, [0.002, 80] would need tiny steps near sigma_min where D changes
    fastest), jointly with the divergence of that field:
    log p_min(x(u_min)) = log p_max(x(u_max)) + int div_x(x - D) du.

    The default prior is N(0, sigma_max^2 I) (EDM style). For data of mean m and covariance C,
    p_{sigma_max} is close to N(m, C + sigma_max^2 I), and for a point with whitened coordinates
    z = C^(-1/2) (x0 - m) the default prior is off by about
    -m.z / sigma_max - (|m|^2 + z.Cz - tr C) / (2 sigma_max^2) nats: O(1e-4) per dimension for
    centred unit data at sigma_max=80, but O(|m| / sigma_max) if the data are not centred
    (pass `prior_logp(x) -> (B,)` to use another prior). divergence="exact" takes one backward pass
    per dimension (fine for 2-D); "hutchinson" uses `num_probes` Rademacher probes drawn once
    from `generator` and held fixed along the trajectory (an unbiased estimate of logp).
    No gradient flows to x0 or to D's parameters.
    """
    if not sigma_min > 0:
        raise ValueError(f"sigma_min must be positive, got {sigma_min}; use e.g. 0.002")
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min ({sigma_min}) must be smaller than sigma_max ({sigma_max})")
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"unknown divergence {divergence!r}; use 'exact' or 'hutchinson'")
    if divergence == "hutchinson" and num_probes < 1:
        raise ValueError(f"num_probes must be >= 1 for the Hutchinson estimator, got {num_probes}")
    if divergence == "exact" and num_probes != 1:
        raise ValueError(f"num_probes={num_probes} only applies to divergence='hutchinson'")
    B, n = x0.shape[0], x0[0].numel()
    probes = None
    if divergence == "hutchinson":  # Rademacher +-1 probes, fixed for the whole solve
        probes = torch.randint(0, 2, (num_probes,) + tuple(x0.shape), generator=generator,
                               device=x0.device).to(x0.dtype) * 2 - 1
    nfe = 0

    def field(u, state):
        nonlocal nfe
        x = state[0].detach().requires_grad_(True)
        sigma = torch.exp(u).to(x.dtype).expand(B)
        with torch.enable_grad():
            f = x - D(x, sigma, cond=cond)
            nfe += 1
            if probes is None:  # one vector-Jacobian product per coordinate: tr(df/dx)
                f_flat, div = f.flatten(1), torch.zeros(B, dtype=x.dtype, device=x.device)
                for i in range(n):
                    (g,) = torch.autograd.grad(f_flat[:, i].sum(), x, retain_graph=True)
                    div = div + g.flatten(1)[:, i]
            else:  # E_v[v^T (df/dx) v] = tr(df/dx) for Rademacher v
                div = torch.zeros(B, dtype=x.dtype, device=x.device)
                for k in range(num_probes):
                    (g,) = torch.autograd.grad(f, x, probes[k], retain_graph=k < num_probes - 1)
                    div = div + (g * probes[k]).flatten(1).sum(1) / num_probes
        return f.detach(), div.detach()

    u = torch.tensor([math.log(sigma_min), math.log(sigma_max)], dtype=torch.float64,
                     device=x0.device)
    state0 = (x0.detach(), torch.zeros(B, dtype=x0.dtype, device=x0.device))
    with torch.no_grad():
        xs, deltas = odeint(field, state0, u, rtol=rtol, atol=atol, method=method)
        x_T, delta = xs[-1], deltas[-1]
        prior = _gaussian_logp(x_T, sigma_max) if prior_logp is None else prior_logp(x_T)
    return prior + delta, nfe


def bits_per_dim(logp, num_dims, *, data_range=2.0, num_bins=256):
    """Bits per dimension of a density over data binned into `num_bins` levels per dimension.

    -logp / (num_dims ln 2) + log2(num_bins / data_range): the density times the bin width
    data_range / num_bins approximates each bin's probability (for [-1, 1] images, +7 bits).
    This is a bound on the discrete model only if logp was computed on uniformly dequantized
    data, as Song et al. do; for plain data it is an approximation.
    """
    return -logp / (num_dims * math.log(2)) + math.log2(num_bins / data_range)
