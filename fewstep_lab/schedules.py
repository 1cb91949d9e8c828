"""Noise schedules in sigma-space, and the change of variables to DDPM's discrete VP world.

Sampling grids follow Karras et al. 2022 ("EDM"), eq. 5: sigma_i = (sigma_max^(1/rho) +
i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, with a final 0 appended. DDPM (Ho et al.
2020, sec. 4) uses a linear beta schedule, Nichol & Dhariwal 2021 (eq. 17) the cosine one.
A VP sample x_vp = sqrt(abar) x0 + sqrt(1 - abar) eps is the sigma-space sample
x = x0 + sigma eps scaled by 1/sqrt(1 + sigma^2), with sigma = sqrt((1 - abar) / abar)
(EDM table 1; Song et al. 2021, eq. 11 integrated). Training-time sigma densities: EDM's
lognormal (sec. 5, ln sigma ~ N(P_mean, P_std^2)).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "karras_sigmas",
    "loglinear_sigmas",
    "append_zero",
    "check_sigmas",
    "ddpm_linear_alphas_cumprod",
    "ddpm_cosine_alphas_cumprod",
    "alphas_cumprod",
    "alpha_bar_to_sigma",
    "sigma_to_alpha_bar",
    "DiscreteSchedule",
    "sample_lognormal_sigma",
]


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """Append the final 0 that every sampling grid ends in."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_grid_args(n: int, sigma_min: float, sigma_max: float) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"the number of steps must be an integer >= 1, got {n!r}")
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ValueError(
            f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )


def karras_sigmas(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, device=None
) -> torch.Tensor:
    """EDM eq. 5: n noise levels from sigma_max down to sigma_min, then 0 (n + 1 values)."""
    _check_grid_args(n, sigma_min, sigma_max)
    if not (0 < rho < math.inf):
        raise ValueError(f"rho must be a positive finite number (EDM uses 7), got {rho}")
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64).float().to(device)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return append_zero(sigmas).float().to(device)


def loglinear_sigmas(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, device=None
) -> torch.Tensor:
    """n log-uniformly spaced levels from sigma_max to sigma_min, then 0 (n + 1 values)."""
    _check_grid_args(n, sigma_min, sigma_max)
    if n == 1:
        return torch.tensor([sigma_max, 0.0]).to(device)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return append_zero(sigmas).float().to(device)


def check_sigmas(sigmas) -> torch.Tensor:
    """Validate a sampling grid: 1-D, >= 2 values, finite, non-negative, strictly decreasing, last 0."""
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(
            f"sigmas must be a 1-D grid of at least 2 values ending in 0, got shape {tuple(sigmas.shape)}; "
            "build one with fewstep_lab.schedules.karras_sigmas(n)"
        )
    if not torch.isfinite(sigmas).all():
        raise ValueError("sigmas contain NaN or inf")
    if (sigmas < 0).any():
        raise ValueError(f"sigmas must be non-negative, got min {sigmas.min().item():g}")
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(
            "sigmas must be strictly decreasing (from the largest noise level to 0); "
            f"got {sigmas.tolist()[:6]}..."
        )
    if sigmas[-1] != 0:
        raise ValueError(
            f"sigmas must end in 0, got last value {sigmas[-1].item():g}; use append_zero(sigmas)"
        )
    return sigmas


# ---------------------------------------------------------------- DDPM / VP, discrete time


def ddpm_linear_alphas_cumprod(
    num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """Ho et al. 2020: betas linear in t, abar_t = prod_{s<=t} (1 - beta_s), float64 (T,)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def ddpm_cosine_alphas_cumprod(
    num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999
) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17, with betas clipped at max_beta (their sec. 3.2), float64 (T,)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)


def alphas_cumprod(kind: str = "linear", num_steps: int = 1000) -> torch.Tensor:
    """DDPM abar_t by schedule name: 'linear' or 'cosine'."""
    if kind == "linear":
        return ddpm_linear_alphas_cumprod(num_steps)
    if kind == "cosine":
        return ddpm_cosine_alphas_cumprod(num_steps)
    raise ValueError(f"unknown DDPM schedule {kind!r}; choose 'linear' or 'cosine'")


def alpha_bar_to_sigma(alpha_bar: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - abar) / abar): the VP -> sigma-space change of variables."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
    """abar = 1 / (1 + sigma^2), the inverse of alpha_bar_to_sigma."""
    return 1 / (1 + sigma**2)


class DiscreteSchedule:
    """Maps between DDPM's discrete timesteps t in {0..T-1} and sigma-space noise levels.

    sigma_of_t is exact on integers; t_of_sigma interpolates linearly in log sigma between the
    two neighbouring timesteps (k-diffusion's convention), so it returns integers for sigmas
    on the grid and fractional t in between.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or ac.numel() < 2 or not ((ac > 0) & (ac < 1)).all():
            raise ValueError("alphas_cumprod must be a 1-D tensor of values in (0, 1)")
        if not (ac[1:] < ac[:-1]).all():
            raise ValueError("alphas_cumprod must be strictly decreasing in t")
        self.alphas_cumprod = ac
        self.sigmas = alpha_bar_to_sigma(ac)  # increasing in t
        self.log_sigmas = self.sigmas.log()

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_of_t(self, t) -> torch.Tensor:
        """sigma at (possibly fractional) timestep t, interpolating log sigma."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_steps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_steps - 1)
        w = t - lo
        interp = ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()
        # exp(log(sigma)) is off by an ulp; on integer t return the table value itself.
        return torch.where(w == 0, self.sigmas[lo], interp)

    def t_of_sigma(self, sigma) -> torch.Tensor:
        """Fractional timestep for sigma (float64), clamped to [0, T-1]."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        ls = self.log_sigmas.to(log_sigma.device)
        idx = torch.searchsorted(ls, log_sigma.clamp(ls[0], ls[-1]).contiguous())
        hi = idx.clamp(1, self.num_steps - 1)
        lo = hi - 1
        w = (log_sigma - ls[lo]) / (ls[hi] - ls[lo])
        return (lo + w.clamp(0, 1)).to(torch.float64)

    def sigmas_for_timesteps(self, timesteps) -> torch.Tensor:
        """Sampling grid (float64, ends in 0) visiting the given decreasing integer timesteps."""
        ts = torch.as_tensor(timesteps, dtype=torch.long)
        if ts.ndim != 1 or ts.numel() < 1:
            raise ValueError("timesteps must be a non-empty 1-D sequence")
        if (ts < 0).any() or (ts >= self.num_steps).any():
            raise ValueError(f"timesteps must lie in [0, {self.num_steps - 1}]")
        # Kept in float64: t_of_sigma then maps each level back to exactly its integer timestep.
        return check_sigmas(append_zero(self.sigmas[ts]))

    def ddim_timesteps(self, n: int) -> torch.Tensor:
        """n evenly spaced timesteps, DDIM's 'leading' spacing (diffusers' default): (T//n)*[n-1..0]."""
        if not isinstance(n, int) or n < 1 or n > self.num_steps:
            raise ValueError(f"steps must be an integer in [1, {self.num_steps}], got {n!r}")
        return torch.arange(n - 1, -1, -1) * (self.num_steps // n)

    def ddim_sigmas(self, n: int) -> torch.Tensor:
        """Sampling grid of n DDIM steps (leading spacing), ending in 0."""
        return self.sigmas_for_timesteps(self.ddim_timesteps(n))


def sample_lognormal_sigma(
    n: int, p_mean: float = -1.2, p_std: float = 1.2, generator=None, device=None
) -> torch.Tensor:
    """EDM sec. 5 training density: ln sigma ~ N(P_mean, P_std^2), shape (n,)."""
    z = torch.randn(n, generator=generator, device=device)
    return (p_mean + p_std * z).exp()
