"""The exact denoiser of a finite set of images, and the exact consistency function it defines.

For data drawn uniformly from K stored images X_k, optionally blurred by isotropic Gaussian
noise of standard deviation ``std`` (a kernel density estimate), and x = x0 + sigma * eps,
the denoiser that minimises the denoising loss (Karras et al. 2022, "EDM", eq. 2-3; Tweedie's
formula, Efron 2011) is the posterior mean

    D(x, sigma) = (sigma^2 * sum_k r_k(x) X_k + std^2 * x) / (sigma^2 + std^2),
    r_k(x) = softmax_k( -|x - X_k|^2 / (2 (sigma^2 + std^2)) ).

It is the Gaussian-mixture denoiser of ``toy2d.py`` with one component per image, written for
thousands of 3072-dimensional components: squared distances in float64, the softmax as a
running log-sum-exp over chunks of images, so memory stays at (batch x chunk). Integrating
the PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 3) from sigma down to sigma_min
gives the exact consistency function f(x, sigma) of Song et al. 2023 ("Consistency
Models", eq. 3-4, with f(x, sigma_min) = x, their boundary condition).

Be clear about what this is: the model MEMORISES its images. With ``std = 0`` every sample
it produces is (up to sigma_min) one of the stored images. It is the optimum of the
denoising loss on that finite set, i.e. what a network would converge to with unlimited
capacity and no generalisation, which makes it a perfect teacher for showing the mechanics
of zero-shot editing (Algorithm 4) on a CPU, and not a generative model of CIFAR-10.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep_lab.precond import as_sigma
from fewstep_lab.sampling import heun_step
from fewstep_lab.schedules import karras_sigmas

__all__ = ["EmpiricalDenoiser", "exact_consistency_function"]


class EmpiricalDenoiser:
    """Tweedie's formula for the (Gaussian-smoothed) empirical distribution of ``images`` (K, C, H, W).

    ``images`` are floats in the model range ([-1, 1] for the course's images); ``std`` >= 0
    is the smoothing; ``chunk_size`` is how many stored images are scored at once.
    Call as ``D(x, sigma)`` with x (B, C, H, W) and sigma a float or (B,) tensor.
    """

    def __init__(self, images: Tensor, std: float = 0.0, *, chunk_size: int = 1024):
        if not isinstance(images, Tensor) or images.ndim < 2 or images.shape[0] < 1:
            raise ValueError("images must be a tensor (K, ...) holding at least one image; "
                             "stack them with torch.stack.")
        if not images.dtype.is_floating_point:
            raise ValueError(f"images have dtype {images.dtype}; the denoiser works in the model's "
                             "float range: convert uint8 pixels with "
                             "fewstep_lab.data.images.to_model_range(images).")
        if not float(std) >= 0:
            raise ValueError(f"std must be >= 0 (0 = the plain empirical distribution), got {std}.")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
        self.shape = tuple(images.shape[1:])
        self.std = float(std)
        self.chunk_size = chunk_size
        self.X = images.detach().reshape(images.shape[0], -1).to(torch.float64)  # (K, d)
        self.X_sq = (self.X * self.X).sum(1)  # (K,) |X_k|^2, reused by every call

    def __len__(self) -> int:
        return self.X.shape[0]

    def _flat(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x has shape {tuple(x.shape)}, the stored images are {self.shape}; "
                             f"pass a batch (B, {', '.join(map(str, self.shape))}).")
        return x.detach().reshape(x.shape[0], -1).to(device=self.X.device, dtype=torch.float64)

    def _sq_dist(self, xf: Tensor, lo: int, hi: int) -> Tensor:
        # |x - X_k|^2 = |x|^2 - 2 x.X_k + |X_k|^2 in float64; clamp the tiny negative rounding.
        x_sq = (xf * xf).sum(1, keepdim=True)
        return (x_sq - 2 * xf @ self.X[lo:hi].T + self.X_sq[lo:hi]).clamp_min(0)

    def nearest(self, x: Tensor) -> Tensor:
        """Index (B,) of the stored image closest to each x in Euclidean distance."""
        xf = self._flat(x)
        best = torch.full((xf.shape[0],), float("inf"), dtype=torch.float64, device=xf.device)
        idx = torch.zeros(xf.shape[0], dtype=torch.long, device=xf.device)
        for lo in range(0, len(self), self.chunk_size):
            d2, j = self._sq_dist(xf, lo, lo + self.chunk_size).min(1)
            better = d2 < best
            best, idx = torch.where(better, d2, best), torch.where(better, j + lo, idx)
        return idx.to(x.device)

    @torch.no_grad()
    def __call__(self, x: Tensor, sigma, cond=None) -> Tensor:
        """EDM eq. 2-3 / Tweedie: posterior mean E[x0 | x] under the empirical (smoothed) data."""
        if cond is not None:
            raise ValueError("EmpiricalDenoiser is unconditional and got cond; for a class-"
                             "conditional model build one denoiser per class from that class's images.")
        xf = self._flat(x)
        s2 = as_sigma(sigma, xf) ** 2  # (B,) float64
        var = s2 + self.std ** 2  # variance of x around each stored image
        if bool((var == 0).any()):
            # sigma = 0 and std = 0: no noise, so E[x0 | x] = x (never reached by heun_step).
            if bool((var == 0).all()):
                return x.clone()
            raise ValueError("sigma = 0 with std = 0 is only supported for the whole batch at once.")
        # Online softmax over chunks of stored images (running max m, normaliser z, weighted sum).
        m = torch.full_like(s2, -float("inf"))
        z = torch.zeros_like(s2)
        acc = torch.zeros_like(xf)
        for lo in range(0, len(self), self.chunk_size):
            hi = lo + self.chunk_size
            logits = -self._sq_dist(xf, lo, hi) / (2 * var[:, None])  # (B, chunk)
            m_new = torch.maximum(m, logits.max(1).values)
            rescale = torch.exp(m - m_new)  # 0 on the first chunk (exp(-inf))
            w = torch.exp(logits - m_new[:, None])
            z = z * rescale + w.sum(1)
            acc = acc * rescale[:, None] + w @ self.X[lo:hi]
            m = m_new
        mean = acc / z[:, None]  # sum_k r_k X_k
        # Smoothing: each component is N(X_k, std^2 I), whose own posterior mean shrinks x to X_k.
        out = (s2[:, None] * mean + self.std ** 2 * xf) / var[:, None]
        return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)


def exact_consistency_function(D, *, sigma_min: float = 0.002, steps: int = 24):
    """Song et al. 2023, eq. 3-4: f(x, sigma) = PF-ODE solution at sigma_min, by Heun on a Karras grid.

    Each batch element gets its own EDM eq. 5 grid of ``steps`` Heun steps (EDM Algorithm 1)
    from its sigma down to sigma_min; f(x, sigma_min) = x exactly (the boundary condition).
    Any denoiser works: EmpiricalDenoiser gives the exact consistency function of its images.
    Returns ``f(x, sigma, cond=None)``, usable wherever a consistency model is expected.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int (Heun steps per call), got {steps!r}.")
    if not sigma_min > 0:
        raise ValueError(f"sigma_min must be positive, got {sigma_min}.")
    rtol = 1e-6  # sigma_min rounded to float32 (0.002 -> 0.0020000001) still counts as sigma_min

    @torch.no_grad()
    def f(x: Tensor, sigma, cond=None) -> Tensor:
        s = as_sigma(sigma, x).to(torch.float64)
        if bool((s < sigma_min * (1 - rtol)).any()):
            raise ValueError(f"f is defined for sigma >= sigma_min = {sigma_min}, got "
                             f"{float(s.min()):g}; clamp the noise levels to sigma_min.")
        at_min = s <= sigma_min * (1 + rtol)
        if bool(at_min.all()):
            return x.clone()  # the boundary condition f(x, sigma_min) = x, exactly
        # (B, steps + 1) grids; elements already at sigma_min get a constant grid, so every
        # Heun step moves them by (d + d_next) / 2 * 0 = 0 and they come back unchanged.
        grids = torch.stack([
            torch.full((steps + 1,), sigma_min, dtype=torch.float64) if bool(done)
            else karras_sigmas(steps + 1, sigma_min, float(si))[:-1].to(torch.float64)
            for si, done in zip(s.cpu(), at_min.cpu())
        ]).to(x.device)
        grids[:, 0] = torch.where(at_min, grids[:, 0], s)  # start exactly at sigma (no float32 rounding)
        for i in range(steps):
            x, _ = heun_step(D, x, grids[:, i], grids[:, i + 1], cond)
        return x

    return f
