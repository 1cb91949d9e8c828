"""Preconditioning: how a diffusion-agnostic network F becomes a denoiser D(x, sigma).

Karras et al. 2022 ("EDM"), eq. 7: D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x,
c_noise(sigma)). What differs between methods is only the scalings function (EDM table 1 and
eq. 7; consistency models: Song et al. 2023, appendix C, eq. 3 shifted so that
c_skip(sigma_min) = 1, c_out(sigma_min) = 0). A DDPM epsilon-network on discrete timesteps
becomes a denoiser through x_vp = x / sqrt(1 + sigma^2) and D = x - sigma * eps (EDM table 1,
"VP"; k-diffusion's DiscreteEpsDDPMDenoiser).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from .schedules import DiscreteSchedule

__all__ = [
    "as_sigma",
    "append_dims",
    "edm_scalings",
    "eps_scalings",
    "consistency_scalings",
    "lcm_scalings",
    "get_scalings",
    "Precond",
    "DiscreteEpsDenoiser",
]


def as_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a float, 0-d or (B,) sigma to shape (B,) on x's device, float32 or x's float dtype."""
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    # Convert straight to the target dtype: as_tensor(python float) alone would round to float32.
    sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(
            f"sigma must be a scalar or have shape (batch,) = ({x.shape[0]},), got {tuple(sigma.shape)}"
        )
    return sigma


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape (B,) to (B, 1, ..., 1) with ndim dimensions, for broadcasting over a sample."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def edm_scalings(sigma: torch.Tensor, sigma_data: float = 0.5):
    """EDM eq. 7 / table 1: (c_skip, c_out, c_in, c_noise) with c_noise = ln(sigma) / 4."""
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data / s2.sqrt()
    c_in = 1 / s2.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def eps_scalings(sigma: torch.Tensor):
    """Epsilon prediction in sigma-space (EDM table 1, 'VP'/'VE' column): D = x - sigma * F(x / sqrt(1+sigma^2))."""
    c_skip = torch.ones_like(sigma)
    c_out = -sigma
    c_in = 1 / (sigma**2 + 1).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def consistency_scalings(sigma: torch.Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002):
    """Song et al. 2023, appendix C: EDM scalings shifted so c_skip(sigma_min)=1 and c_out(sigma_min)=0."""
    # The shift (sigma - sigma_min) is what enforces the boundary condition f(x, sigma_min) = x
    # exactly, for any network output: at sigma_min c_skip is exactly 1 and c_out exactly 0.
    shifted = sigma - sigma_min
    # Written as 1 / (1 + (shifted / sigma_data)^2): sigma_data^2 / (0 + sigma_data^2) is not
    # exactly 1 in float32 when sigma_data^2 is not representable (e.g. sigma_data = 1.3).
    c_skip = 1 / (1 + (shifted / sigma_data) ** 2)
    c_out = shifted * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def lcm_scalings(sigma: torch.Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 timestep_scaling: float = 10.0):
    """Luo et al. 2023 (LCM), sec. 4.1: f = c_skip x + c_out x0_hat, with LCM's boundary scalings.

    LCM computes c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2), c_out(t) = s t / sqrt((s t)^2 +
    sigma_data^2) (s = timestep_scaling = 10, sigma_data = 0.5; ``scalings_for_boundary_conditions``
    in their code) on top of the teacher's x0 prediction. Here t = sigma - sigma_min (the CM shift:
    LCM's t is a DDPM timestep, zero at the boundary), and x0_hat is EDM's preconditioned
    prediction e_skip x + e_out F, so that a student copied from an EDM teacher predicts what the
    teacher predicts: c_skip = b_skip + b_out e_skip, c_out = b_out e_out. At sigma_min, b_skip = 1
    and b_out = 0 exactly, so f(x, sigma_min) = x for any network. Unlike CM's, LCM's pair does not
    sum to one (b_out lacks CM's factor sigma_data): between sigma_min and about 0.3, c_skip exceeds 1
    (1.21 at sigma = 0.05); LCM never meets this zone (its t is an integer timestep, and b_skip(1) =
    0.0025), and by sigma = 0.5 f is EDM's x0 prediction to within 1.5 % (tests/test_lcm.py).
    """
    t = timestep_scaling * (sigma - sigma_min)
    b_skip = 1 / (1 + (t / sigma_data) ** 2)  # exactly 1 at t = 0 (see consistency_scalings)
    b_out = t / (t**2 + sigma_data**2).sqrt()
    e_skip, e_out, c_in, c_noise = edm_scalings(sigma, sigma_data)
    return b_skip + b_out * e_skip, b_out * e_out, c_in, c_noise


_SCALINGS = {"edm": edm_scalings, "eps": eps_scalings, "consistency": consistency_scalings, "lcm": lcm_scalings}


def get_scalings(name: str, **kwargs) -> Callable:
    """A scalings function by name ('edm', 'eps', 'consistency', 'lcm'), with its constants bound."""
    if name not in _SCALINGS:
        raise ValueError(f"unknown scalings {name!r}; choose one of {sorted(_SCALINGS)}")
    return functools.partial(_SCALINGS[name], **kwargs) if kwargs else _SCALINGS[name]


class Precond(nn.Module):
    """EDM eq. 7: D(x, sigma, cond) = c_skip x + c_out F(c_in x, c_noise, cond)."""

    def __init__(self, net: nn.Module, scalings: Callable):
        super().__init__()
        self.net = net
        self.scalings = scalings

    def forward(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        sigma = as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = (append_dims(c, x.ndim) for c in self.scalings(sigma))
        F = self.net(c_in * x, c_noise.reshape(-1), cond)
        # F may come back in bf16 under autocast; compute the output in x's precision.
        return c_skip * x + c_out * F.to(x.dtype)


class DiscreteEpsDenoiser(nn.Module):
    """A DDPM epsilon-network eps_model(x_vp, t) on discrete timesteps, seen as a denoiser D(x, sigma).

    x_vp = x / sqrt(1 + sigma^2); t = the (fractional, log-sigma interpolated) timestep of sigma;
    D(x, sigma) = x - sigma * eps. With `quantize=True` t is rounded to the nearest integer
    timestep (what a network trained only on integer t expects off the grid).
    """

    def __init__(self, eps_model: nn.Module, alphas_cumprod: torch.Tensor, *, quantize: bool = False):
        super().__init__()
        self.eps_model = eps_model
        self.schedule = DiscreteSchedule(alphas_cumprod)
        self.quantize = quantize

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def forward(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        sigma = as_sigma(sigma, x)
        t = self.schedule.t_of_sigma(sigma)
        if self.quantize:
            t = t.round()
        t = t.to(x.dtype)
        c_in = append_dims(1 / (sigma**2 + 1).sqrt(), x.ndim)
        eps = self.eps_model(x * c_in, t) if cond is None else self.eps_model(x * c_in, t, cond)
        return x - append_dims(sigma, x.ndim) * eps.to(x.dtype)

