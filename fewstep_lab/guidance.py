"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper, in LCM's convention.

Latent consistency models (Luo et al. 2023, sec. 4.2) write the guided noise prediction as
eps_w(x, c, t) = (1 + w) eps(x, c, t) - w eps(x, ∅, t). Since D = x - sigma eps in sigma-space
(EDM table 1), the same combination of denoisers is
    D_w(x, sigma, c) = D(x, sigma, ∅) + (1 + w) (D(x, sigma, c) - D(x, sigma, ∅)),
because x - sigma [(1 + w) eps_c - w eps_∅] = (1 + w)(x - sigma eps_c) - w (x - sigma eps_∅).
So guiding the denoiser and guiding epsilon are the same thing. Ho & Salimans 2022 (eq. 6) use
the same w as LCM; diffusers' ``guidance_scale`` is 1 + w (eps_∅ + s (eps_c - eps_∅)), so
``guidance_scale = 1`` (w = 0) is the plain conditional model and w = -1 the unconditional one.
D_w is in general not the denoiser of any distribution: for w > 0 it extrapolates beyond the
conditional posterior mean, and its "score" (D_w - x) / sigma^2 need not be a gradient field of
one family of noisy marginals.

Labels: ``cond`` is a (B,) long tensor; ``null_label`` (the nets' "no label" slot, num_classes)
asks for the unconditional denoiser.
"""

from __future__ import annotations

import torch
from torch import nn

from .precond import append_dims, as_sigma

__all__ = ["CFGDenoiser", "cfg_denoiser", "null_label_of"]


def null_label_of(D) -> int:
    """The 'no label' value of a conditional denoiser: its (or its network's) num_classes.

    Looks through DistributedDataParallel (.module), Precond (.net) and bound methods (.__self__,
    e.g. a labelled mixture's .denoiser); a ValueError when D is not class-conditional.
    """
    seen, todo = set(), [D]
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        n = getattr(obj, "num_classes", None)
        if isinstance(n, int) and not isinstance(n, bool):
            return n
        todo += [getattr(obj, a, None) for a in ("module", "net", "__self__")]
    raise ValueError("guidance needs a class-conditional denoiser (a network built with num_classes, e.g. an "
                     "edm-cfg teacher, or a labelled mixture's exact denoiser); this one has no num_classes")


class CFGDenoiser(nn.Module):
    """D_w(x, sigma, c) = D(x, sigma, ∅) + (1 + w)(D(x, sigma, c) - D(x, sigma, ∅)); w a float or (B,) tensor.

    Both evaluations go through D as ONE batch of 2B (what diffusers' pipelines do), so a network
    teacher costs one (larger) forward pass. cond=None returns the unconditional D(x, sigma, ∅).
    """

    def __init__(self, D, w, null_label: int):
        super().__init__()
        self.D, self.w, self.null_label = D, w, int(null_label)

    def forward(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        B = x.shape[0]
        null = torch.full((B,), self.null_label, dtype=torch.long, device=x.device)
        if cond is None:
            return self.D(x, sigma, null)
        cond = torch.as_tensor(cond, device=x.device).long()
        sigma = as_sigma(sigma, x)
        both = self.D(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond.expand(B), null]))
        d_cond, d_uncond = both[:B], both[B:]
        w = torch.as_tensor(self.w, dtype=x.dtype, device=x.device)
        w = append_dims(w.expand(B) if w.ndim == 0 else w, x.ndim)
        return d_uncond + (1 + w) * (d_cond - d_uncond)


def cfg_denoiser(D, w, null_label: int | None = None) -> CFGDenoiser:
    """CFGDenoiser(D, w, null_label), the null label read from D (null_label_of) when not given."""
    return CFGDenoiser(D, w, null_label_of(D) if null_label is None else null_label)
