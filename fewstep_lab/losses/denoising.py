"""Denoising losses: the training objectives of DDPM, score SDEs and EDM, as free functions.

All return per-sample losses of shape (B,) (mean over the sample's dimensions); the train loop
averages them. In sigma-space, denoising score matching (Vincent 2011; Song et al. 2021, eq. 7)
with weight lambda(sigma) = sigma^2 is the plain denoising error ||D(x0 + sigma n) - x0||^2 /
sigma^2, because the score is (D - x) / sigma^2. EDM's loss (Karras et al. 2022, eq. 8 and
table 1) samples ln sigma ~ N(P_mean, P_std^2) and weights by
lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2. DDPM's L_simple (Ho et al. 2020,
eq. 14) regresses the noise of x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at uniform t.
"""

from __future__ import annotations

import torch

from ..precond import append_dims
from ..sampling import randn_like
from ..schedules import sample_lognormal_sigma

__all__ = ["denoising_loss", "score_matching_loss", "edm_loss", "ddpm_loss"]


def _per_sample(err: torch.Tensor) -> torch.Tensor:
    return err.reshape(err.shape[0], -1).mean(1)


def denoising_loss(D, x0, sigma, *, weight=None, generator=None, cond=None) -> torch.Tensor:
    """w(sigma) * ||D(x0 + sigma n, sigma) - x0||^2 per sample (EDM eq. 2 with a weight)."""
    sigma = torch.as_tensor(sigma, device=x0.device, dtype=x0.dtype).expand(x0.shape[0])
    x = x0 + append_dims(sigma, x0.ndim) * randn_like(x0, generator)
    err = _per_sample((D(x, sigma, cond) - x0) ** 2)
    return err if weight is None else weight * err


def score_matching_loss(D, x0, sigma, *, generator=None, cond=None) -> torch.Tensor:
    """Denoising score matching with lambda(sigma) = sigma^2 (Song et al. 2021, eq. 7), in denoiser form."""
    sigma = torch.as_tensor(sigma, device=x0.device, dtype=x0.dtype).expand(x0.shape[0])
    return denoising_loss(D, x0, sigma, weight=1 / sigma**2, generator=generator, cond=cond)


def edm_loss(
    D, x0, *, generator=None, cond=None, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5
) -> torch.Tensor:
    """EDM's training loss (Karras et al. 2022, eq. 8, table 1: lognormal sigma, lambda = 1/c_out^2)."""
    sigma = sample_lognormal_sigma(x0.shape[0], p_mean, p_std, generator=generator).to(x0.device, x0.dtype)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return denoising_loss(D, x0, sigma, weight=weight, generator=generator, cond=cond)


def ddpm_loss(eps_model, x0, alphas_cumprod, *, generator=None, cond=None) -> torch.Tensor:
    """DDPM's L_simple (Ho et al. 2020, Algorithm 1, eq. 14): ||eps - eps_model(x_t, t)||^2 at uniform t."""
    ac = torch.as_tensor(alphas_cumprod, device=x0.device)
    t = torch.randint(0, len(ac), (x0.shape[0],), generator=generator).to(x0.device)
    a = append_dims(ac[t].to(x0.dtype), x0.ndim)
    eps = randn_like(x0, generator)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    pred = eps_model(x_t, t.to(x0.dtype)) if cond is None else eps_model(x_t, t.to(x0.dtype), cond)
    return _per_sample((pred - eps) ** 2)
