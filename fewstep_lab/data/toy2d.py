"""Toy 2-D data, and Gaussian mixtures whose denoiser is known exactly at every noise level.

For x0 ~ sum_k w_k N(mu_k, S_k) and x = x0 + sigma eps, the noisy marginal is
p_sigma = sum_k w_k N(mu_k, S_k + sigma^2 I), and the optimal denoiser (Tweedie's formula,
Efron 2011; EDM eq. 2-3) is the posterior mean
    D(x, sigma) = sum_k r_k(x) [mu_k + S_k (S_k + sigma^2 I)^-1 (x - mu_k)],
with responsibilities r_k(x) proportional to w_k N(x; mu_k, S_k + sigma^2 I). Its score is
(D(x, sigma) - x) / sigma^2, so the PF-ODE of a mixture can be integrated exactly: the
"perfect teacher" that separates what a sampler loses from what training loses.
The checkerboard is a mixture of uniform squares, whose exact denoiser is closed form as well
(a product of truncated-normal means). The other toy sets (two moons, swiss roll, pinwheel;
Grathwohl et al. 2019's FFJORD collection) are sample-only. Every set is scaled to a per-coordinate std near 0.5,
EDM's sigma_data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "GaussianMixture",
    "UniformBoxMixture",
    "checkerboard",
    "SampleOnly",
    "eight_gaussians",
    "grid25",
    "five_gaussians",
    "gaussian",
    "DATASETS",
    "get_dataset",
]


def _rand(shape, generator):
    return torch.rand(shape, generator=generator, dtype=torch.float64)


def _randn(shape, generator):
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def _apply(mats, v):
    """mats (G, K, d, d) times vectors v (B, K, d) -> (B, K, d); G = 1 broadcasts without copies."""
    if mats.shape[0] == 1:
        return torch.einsum("kij,bkj->bki", mats[0], v)
    return (mats @ v[..., None])[..., 0]



def _unconditional(cond, name: str) -> None:
    """The exact denoisers know one distribution: a label or other condition cannot be used, so it is refused."""
    if cond is not None:
        raise ValueError(f"{name} is unconditional: its exact denoiser takes cond=None, got a cond of type "
                         f"{type(cond).__name__}; drop cond (or train a conditional network for labels)")

class GaussianMixture:
    """sum_k w_k N(mu_k, S_k) in d dimensions with exact denoiser, score and log-density at every sigma."""

    def __init__(self, means, covs, weights=None, name: str = "mixture"):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError("means must have shape (K, d)")
        k, d = self.means.shape
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.ndim == 0:
            covs = covs * torch.eye(d, dtype=torch.float64).expand(k, d, d)
        elif covs.ndim == 1:
            covs = covs[:, None, None] * torch.eye(d, dtype=torch.float64)
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must be a scalar, (K,) variances or (K, d, d); got {tuple(covs.shape)}")
        self.covs = covs.contiguous()
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(
            weights, dtype=torch.float64)
        if w.shape != (k,) or (w < 0).any() or abs(float(w.sum()) - 1) > 1e-9:
            raise ValueError("weights must be K non-negative numbers summing to 1")
        self.weights = w
        self.name = name
        self.dim = d

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, generator=None, *, stratified: bool = False, return_labels: bool = False):
        """n float32 points; stratified=True gives each component round(n w_k) points (counts sum to n)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if stratified:
            counts = torch.floor(self.weights * n).long()
            rest = n - int(counts.sum())
            counts[torch.argsort(self.weights * n - counts, descending=True)[:rest]] += 1
            labels = torch.repeat_interleave(torch.arange(len(counts)), counts)
        else:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)
        z = _randn((n, self.dim), generator)
        x = self.means[labels] + torch.einsum("nij,nj->ni", chol[labels], z)
        x = x.float()
        return (x, labels) if return_labels else x

    # ------------------------------------------------------------------ closed forms
    def _noisy(self, sigma, x):
        """Per-component precision P, log-determinant and gain S (S + sigma^2 I)^-1 of the noisy marginal.

        Shapes (G, K, d, d), (G, K), (G, K, d, d) with G = 1 when sigma is the same for the whole
        batch (every sampler's case: one small inverse per component instead of one per sample),
        else G = B.
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
        if bool((sigma == sigma[0]).all()):
            sigma = sigma[:1]
        eye = torch.eye(self.dim, dtype=torch.float64, device=x.device)
        covs = self.covs.to(x.device)[None]
        cov = covs + (sigma**2)[:, None, None, None] * eye  # (G, K, d, d)
        prec = torch.linalg.inv(cov)
        return prec, torch.logdet(cov), covs @ prec

    def log_resp(self, x, sigma):
        """log w_k N(x; mu_k, S_k + sigma^2 I), shape (B, K), float64."""
        x = x.to(torch.float64)
        prec, logdet, _ = self._noisy(sigma, x)
        diff = x[:, None, :] - self.means.to(x.device)[None]
        maha = (_apply(prec, diff) * diff).sum(-1)
        return self.weights.to(x.device).log() - 0.5 * (maha + logdet + self.dim * math.log(2 * math.pi))

    def log_prob(self, x, sigma=0.0):
        """log p_sigma(x) of the noisy marginal, shape (B,)."""
        return torch.logsumexp(self.log_resp(x, sigma), dim=1)

    def responsibilities(self, x, sigma=0.0):
        """Posterior component probabilities r_k(x) at noise level sigma, (B, K)."""
        return torch.softmax(self.log_resp(x, sigma), dim=1)

    def denoiser(self, x, sigma, cond=None):
        """The exact D(x, sigma) = E[x0 | x] (Tweedie), in x's dtype; a drop-in sigma-space denoiser."""
        _unconditional(cond, type(self).__name__)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        x64 = x.to(torch.float64)
        _, _, gain = self._noisy(sigma, x64)
        r = torch.softmax(self.log_resp(x64, sigma), dim=1)
        diff = x64[:, None, :] - self.means.to(x.device)[None]
        post = self.means.to(x.device)[None] + _apply(gain, diff)
        return (r[..., None] * post).sum(1).to(x.dtype)

    __call__ = denoiser

    def score(self, x, sigma):
        """grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2."""
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        s = s.expand(x.shape[0]) if s.ndim == 0 else s
        return (self.denoiser(x, s) - x) / s[:, None] ** 2

    def assign(self, x):
        """Most likely component of each clean point (for mode-weight metrics), (B,)."""
        return self.log_resp(x, 0.0).argmax(1)

    def mean_and_cov(self):
        """Overall mean (d,) and covariance (d, d) of the mixture."""
        m = (self.weights[:, None] * self.means).sum(0)
        diff = self.means - m
        cov = (self.weights[:, None, None] * (self.covs + diff[:, :, None] * diff[:, None, :])).sum(0)
        return m, cov


class UniformBoxMixture:
    """sum_k w_k Uniform(box_k) with axis-aligned boxes: its exact denoiser is closed form too.

    For x = x0 + sigma eps and x0 uniform on [a, b] (per axis), the posterior of x0 is a normal
    N(x, sigma^2) truncated to [a, b]: its mean is x + sigma (phi(alpha) - phi(beta)) / Z with
    alpha = (a - x)/sigma, beta = (b - x)/sigma, Z = Phi(beta) - Phi(alpha), and the box's
    responsibility is proportional to w_k prod_i Z_i / (b_i - a_i). Computed in log space
    (torch.special.log_ndtr), so it stays exact at sigma = 0.002 and far from the boxes.
    """

    def __init__(self, lows, highs, weights=None, name: str = "boxes"):
        self.lows = torch.as_tensor(lows, dtype=torch.float64)
        self.highs = torch.as_tensor(highs, dtype=torch.float64)
        if self.lows.ndim != 2 or self.lows.shape != self.highs.shape or not (self.highs > self.lows).all():
            raise ValueError("lows and highs must both have shape (K, d) with highs > lows")
        k, self.dim = self.lows.shape
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(
            weights, dtype=torch.float64)
        if w.shape != (k,) or (w < 0).any() or abs(float(w.sum()) - 1) > 1e-9:
            raise ValueError("weights must be K non-negative numbers summing to 1")
        self.weights, self.name = w, name

    def sample(self, n: int, generator=None, *, return_labels: bool = False):
        """n float32 points (and their box labels)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        u = _rand((n, self.dim), generator)
        x = (self.lows[labels] + u * (self.highs - self.lows)[labels]).float()
        return (x, labels) if return_labels else x

    def _terms(self, x, sigma):
        x = x.to(torch.float64)[:, None, :]  # (B, 1, d)
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        s = (s.expand(x.shape[0]) if s.ndim == 0 else s)[:, None, None]
        alpha, beta = (self.lows - x) / s, (self.highs - x) / s  # (B, K, d)
        # log(Phi(beta) - Phi(alpha)), using the tail that keeps the difference accurate.
        upper = alpha > 0
        hi = torch.where(upper, torch.special.log_ndtr(-alpha), torch.special.log_ndtr(beta))
        lo = torch.where(upper, torch.special.log_ndtr(-beta), torch.special.log_ndtr(alpha))
        log_z = hi + torch.log1p(-torch.exp(lo - hi).clamp(max=1 - 1e-16))
        return x, s, alpha, beta, log_z

    def log_resp(self, x, sigma):
        """log w_k p(x | box k) at noise level sigma, (B, K)."""
        _, _, _, _, log_z = self._terms(x, sigma)
        return self.weights.log() + (log_z - torch.log(self.highs - self.lows)).sum(-1)

    def log_prob(self, x, sigma):
        """log p_sigma(x), (B,)."""
        return torch.logsumexp(self.log_resp(x, sigma), dim=1)

    def denoiser(self, x, sigma, cond=None):
        """The exact D(x, sigma) = E[x0 | x], in x's dtype."""
        _unconditional(cond, type(self).__name__)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        x64, s, alpha, beta, log_z = self._terms(x, sigma)
        log_phi = lambda t: -0.5 * t**2 - 0.5 * math.log(2 * math.pi)  # noqa: E731
        mean = x64 + s * (torch.exp(log_phi(alpha) - log_z) - torch.exp(log_phi(beta) - log_z))  # (B, K, d)
        r = torch.softmax(self.weights.log() + (log_z - torch.log(self.highs - self.lows)).sum(-1), dim=1)
        return (r[..., None] * mean).sum(1).to(x.dtype)

    __call__ = denoiser

    def assign(self, x):
        """The box each point lies in (or is closest to), (B,)."""
        x = x.to(torch.float64)[:, None, :]
        gap = (self.lows - x).clamp(min=0) + (x - self.highs).clamp(min=0)
        return (gap**2).sum(-1).argmin(1)


@dataclass(frozen=True)
class SampleOnly:
    """A toy set known only through samples."""

    name: str
    sampler: object

    def sample(self, n: int, generator=None):
        """n float32 points."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        return self.sampler(n, generator).float()


# ---------------------------------------------------------------------- the sets


def eight_gaussians(radius: float = 0.7, std: float = 0.05) -> GaussianMixture:
    """8 equal Gaussians on a circle (per-coordinate std ~0.5)."""
    a = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    means = radius * torch.stack([a.cos(), a.sin()], 1)
    return GaussianMixture(means, torch.full((8,), std**2), name="8gaussians")


def grid25(spacing: float = 0.35, std: float = 0.04) -> GaussianMixture:
    """A 5 x 5 grid of equal Gaussians (per-coordinate std ~0.5)."""
    g = (torch.arange(5, dtype=torch.float64) - 2) * spacing
    means = torch.cartesian_prod(g, g)
    return GaussianMixture(means, torch.full((25,), std**2), name="grid25")


def five_gaussians() -> GaussianMixture:
    """5 unequal, anisotropic components: checks mode weights and shapes, not just positions."""
    means = [[-0.6, -0.4], [0.7, -0.5], [0.0, 0.7], [-0.5, 0.5], [0.6, 0.4]]
    covs = [[[0.02, 0.015], [0.015, 0.03]], [[0.01, 0.0], [0.0, 0.04]], [[0.03, -0.01], [-0.01, 0.01]],
            [[0.005, 0.0], [0.0, 0.005]], [[0.02, 0.0], [0.0, 0.02]]]
    return GaussianMixture(means, covs, weights=[0.3, 0.25, 0.2, 0.15, 0.1], name="5gaussians")


def gaussian(mean=(0.0, 0.0), std: float = 0.5) -> GaussianMixture:
    """A single isotropic Gaussian: every consistency quantity is then in closed form."""
    return GaussianMixture([list(mean)], torch.tensor([std**2]), name="gaussian")


def _moons(n, g):
    t = _rand(n, g) * math.pi
    upper = _rand(n, g) < 0.5
    x = torch.where(upper, t.cos(), 1 - t.cos())
    y = torch.where(upper, t.sin(), 0.5 - t.sin())
    pts = torch.stack([x - 0.5, y - 0.25], 1) + 0.05 * _randn((n, 2), g)
    return pts * 0.55


def _swiss_roll(n, g):
    t = 1.5 * math.pi * (1 + 2 * _rand(n, g))
    pts = torch.stack([t * t.cos(), t * t.sin()], 1) + 0.3 * _randn((n, 2), g)
    return pts / 16.0


def checkerboard(scale: float = 0.45) -> UniformBoxMixture:
    """8 unit squares of a 4 x 4 board (Grathwohl et al. 2019's checkerboard), scaled to std ~0.5."""
    lows = [[c, c % 2 - 2 * r] for c in range(-2, 2) for r in (0, 1)]
    lows = torch.tensor(lows, dtype=torch.float64)
    return UniformBoxMixture(lows * scale, (lows + 1) * scale, name="checkerboard")


def _pinwheel(n, g, arms: int = 5, radial_std=0.3, tangential_std=0.1, rate=0.25):
    labels = torch.randint(0, arms, (n,), generator=g)
    feats = _randn((n, 2), g) * torch.tensor([radial_std, tangential_std], dtype=torch.float64)
    feats[:, 0] += 1.0
    angle = labels.double() * 2 * math.pi / arms + rate * feats[:, 0].exp()
    c, s = angle.cos(), angle.sin()
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    return torch.einsum("nij,nj->ni", rot, feats) * 0.65


def _eight_gaussians_4class():
    # Imported here: data/labelled.py builds on this module's GaussianMixture.
    from .labelled import eight_gaussians_4class

    return eight_gaussians_4class()


def _eight_gaussians_4class_inner():
    from .labelled import eight_gaussians_4class_inner

    return eight_gaussians_4class_inner()


DATASETS = {
    "8gaussians": eight_gaussians,
    "grid25": grid25,
    "5gaussians": five_gaussians,
    "gaussian": gaussian,
    "moons": lambda: SampleOnly("moons", _moons),
    "swissroll": lambda: SampleOnly("swissroll", _swiss_roll),
    "checkerboard": checkerboard,
    "pinwheel": lambda: SampleOnly("pinwheel", _pinwheel),
    # Labelled mixtures (data/labelled.py): exact class-conditional denoisers, for guidance.
    "8gaussians-4class": _eight_gaussians_4class,
    "8gaussians-4class-inner": _eight_gaussians_4class_inner,  # the same on radius 0.4 (a style LoRA's data)
}


def get_dataset(name: str):
    """A toy dataset by name; mixtures (Gaussian or uniform boxes) carry an exact .denoiser, the others only .sample."""
    if name not in DATASETS:
        raise ValueError(f"unknown toy dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]()
