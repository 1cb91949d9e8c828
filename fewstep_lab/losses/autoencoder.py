"""The first-stage loss of latent diffusion: L1 reconstruction + a weak KL term (Rombach et al. 2022).

LDM trains its "KL-reg." autoencoders (sec. 3.1, appendix G) with

    L = sum_pixels |x - G(z)| + kl_weight * KL(q(z|x) || N(0, I)),   z ~ q(z|x) = N(mean, diag(exp(logvar))),

(its ``LPIPSWithDiscriminator`` adds a perceptual and an adversarial term, which this course
replaces by an optional feature loss on the shipped classifier: no LPIPS weights can be
downloaded here). The KL of a diagonal Gaussian to the standard normal is closed-form,

    KL = 1/2 sum_latent (mean^2 + exp(logvar) - 1 - logvar)   (Kingma & Welling 2014, appendix B).

Here the whole sum is divided by the number of pixel values, so the loss reads as a mean
absolute error per pixel while ``kl_weight`` keeps LDM's meaning (1e-6 in its KL-f4/f8 configs).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["kl_divergence", "autoencoder_loss"]


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over the latent: (B,)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def autoencoder_loss(ae, x: torch.Tensor, *, kl_weight: float, generator: torch.Generator | None = None,
                     feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     feature_weight: float = 0.0) -> torch.Tensor:
    """(sum |x - G(z)| + kl_weight * KL) / pixel values per sample, z ~ q(z|x) (LDM sec. 3.1): (B,).

    feature_fn (images in [-1, 1] -> (B, d) features, e.g. the shipped classifier's) adds
    ``feature_weight * mean_d (f(x) - f(G(z)))^2``, a stand-in for LDM's perceptual (LPIPS) loss.
    """
    if kl_weight < 0 or feature_weight < 0:
        raise ValueError(f"kl_weight and feature_weight must be >= 0, got {kl_weight} and {feature_weight}")
    if feature_weight > 0 and feature_fn is None:
        raise ValueError("feature_weight > 0 needs a feature_fn")
    recon, mean, logvar = ae(x, generator)
    pixels = x[0].numel()
    loss = ((recon - x).abs().flatten(1).sum(1) + kl_weight * kl_divergence(mean, logvar)) / pixels
    if feature_weight > 0:
        loss = loss + feature_weight * (feature_fn(x) - feature_fn(recon)).pow(2).flatten(1).mean(1)
    return loss
