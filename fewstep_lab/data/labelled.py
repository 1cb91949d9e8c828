"""Labelled Gaussian mixtures: exact class-conditional and unconditional denoisers, for guidance.

A labelled mixture is sum_k w_k N(mu_k, S_k) whose components carry class labels y_k. The
class-conditional distribution p(x0 | c) is the mixture restricted to the class's components
with renormalised weights w_k / sum_{y_j = c} w_j, so its exact denoiser (Tweedie's formula,
EDM eq. 2-3) is the unconditional one with the responsibilities r_k(x) masked to the class and
renormalised: D(x, sigma, c) = sum_{y_k = c} r_k(x) m_k(x) / sum_{y_k = c} r_k(x). With these,
classifier-free guidance (Ho & Salimans 2022; ``fewstep_lab.guidance``) and the guided PF-ODE of
latent consistency models (Luo et al. 2023, sec. 4.2) are exact on 2-D data.

Labels follow the networks' convention: ``cond`` is a (B,) long tensor in 0..num_classes, and
the value ``num_classes`` means "no label" (the unconditional denoiser); ``cond=None`` too.
"""

from __future__ import annotations

import math

import torch

from .toy2d import GaussianMixture, _apply

__all__ = ["LabelledGaussianMixture", "eight_gaussians_4class", "eight_gaussians_4class_inner"]


class LabelledGaussianMixture(GaussianMixture):
    """A GaussianMixture whose components carry class labels; exact D(x, sigma, c) for every class."""

    def __init__(self, means, covs, classes, weights=None, name: str = "labelled-mixture"):
        super().__init__(means, covs, weights, name=name)
        self.classes = torch.as_tensor(classes, dtype=torch.long)
        if self.classes.shape != (len(self.means),) or int(self.classes.min()) != 0:
            raise ValueError("classes must hold one label per component, numbered from 0")
        self.num_classes = int(self.classes.max()) + 1
        if set(self.classes.tolist()) != set(range(self.num_classes)):
            raise ValueError("every class 0..num_classes-1 needs at least one component")

    @property
    def null_label(self) -> int:
        """The 'no label' value (the nets' label slot for classifier-free guidance)."""
        return self.num_classes

    def class_weights(self) -> torch.Tensor:
        """p(c) = sum of the weights of the class's components, (num_classes,)."""
        return torch.zeros(self.num_classes, dtype=torch.float64).index_add_(0, self.classes, self.weights)

    def class_mixture(self, c: int) -> GaussianMixture:
        """p(x0 | c): the components of class c with renormalised weights (a plain GaussianMixture)."""
        keep = self.classes == int(c)
        if not bool(keep.any()):
            raise ValueError(f"class {c} is not in 0..{self.num_classes - 1}")
        w = self.weights[keep]
        return GaussianMixture(self.means[keep], self.covs[keep], w / w.sum(), name=f"{self.name}[class {c}]")

    def sample_with_classes(self, n: int, generator=None):
        """n float32 points and their CLASS labels (B,) long (``sample(return_labels=True)`` gives components)."""
        x, comp = self.sample(n, generator, return_labels=True)
        return x, self.classes[comp]

    def sample_class(self, n: int, c: int, generator=None) -> torch.Tensor:
        """n float32 points of class c."""
        return self.class_mixture(c).sample(n, generator)

    def _labels(self, cond, batch: int, device) -> torch.Tensor | None:
        """cond as a (B,) long tensor, or None when every sample is unconditional."""
        if cond is None:
            return None
        cond = torch.as_tensor(cond, device=device)
        if cond.dtype.is_floating_point or cond.dtype == torch.bool:
            raise ValueError(f"cond must hold integer class labels, got dtype {cond.dtype}")
        cond = cond.long().expand(batch) if cond.ndim == 0 else cond.long()
        if cond.shape != (batch,):
            raise ValueError(f"cond must be a (B,) = ({batch},) tensor of labels, got shape {tuple(cond.shape)}")
        if bool(((cond < 0) | (cond > self.num_classes)).any()):
            raise ValueError(f"labels must lie in 0..{self.num_classes} ({self.num_classes} = no label)")
        return cond

    def log_resp(self, x, sigma, cond=None):
        """log w_k N(x; mu_k, S_k + sigma^2 I), (B, K); with cond, -inf outside each sample's class."""
        lr = super().log_resp(x, sigma)
        labels = self._labels(cond, x.shape[0], x.device)
        if labels is None:
            return lr
        classes = self.classes.to(x.device)
        keep = (classes[None, :] == labels[:, None]) | (labels[:, None] == self.num_classes)
        return lr.masked_fill(~keep, -math.inf)

    def denoiser(self, x, sigma, cond=None):
        """The exact E[x0 | x, c] (cond (B,) labels; num_classes or None: E[x0 | x]), in x's dtype."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        x64 = x.to(torch.float64)
        _, _, gain = self._noisy(sigma, x64)
        r = torch.softmax(self.log_resp(x64, sigma, cond), dim=1)
        means = self.means.to(x.device)[None]
        post = means + _apply(gain, x64[:, None, :] - means)
        return (r[..., None] * post).sum(1).to(x.dtype)

    __call__ = denoiser

    def score(self, x, sigma, cond=None):
        """grad log p_sigma(x | c) = (D(x, sigma, c) - x) / sigma^2."""
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        s = s.expand(x.shape[0]) if s.ndim == 0 else s
        return (self.denoiser(x, s, cond) - x) / s[:, None] ** 2


def eight_gaussians_4class(radius: float = 0.7, std: float = 0.05) -> LabelledGaussianMixture:
    """The 8 gaussians in 4 classes of 2 opposite modes: mode i has class i mod 4.

    Each mode's neighbours on the circle belong to other classes, so at moderate noise a class's
    posterior shares its neighbourhood with two others: guidance has something to separate.
    """
    a = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    means = radius * torch.stack([a.cos(), a.sin()], 1)
    return LabelledGaussianMixture(means, torch.full((8,), std**2), torch.arange(8) % 4, name="8gaussians-4class")


def eight_gaussians_4class_inner() -> LabelledGaussianMixture:
    """The same 8 modes and 4 classes on a smaller circle (radius 0.4): a "style" of 8gaussians-4class for a
    style LoRA (methods/lora.py) fine-tuned from a model of the original."""
    mix = eight_gaussians_4class(radius=0.4)
    mix.name = "8gaussians-4class-inner"
    return mix
