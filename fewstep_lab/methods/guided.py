"""A class-conditional EDM teacher for classifier-free guidance ("edm-cfg").

Ho & Salimans 2022 (Algorithm 1): one network learns the conditional and the unconditional
denoiser at once, by replacing each training label with the "no label" token (the nets' label
slot num_classes) with probability p_uncond. The loss is EDM's (Karras et al. 2022, eq. 8) on
the labelled batch; sampling is Heun (EDM Algorithm 1) and needs ``cond`` (labels), guided or
not (``guidance.CFGDenoiser``). It may serve as the teacher of LCM (``methods/lcm.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..guidance import null_label_of
from ..losses.denoising import edm_loss
from ..recipes import _finite
from . import register
from .diffusion import EDM, EDMRecipe

__all__ = ["EDMCFGRecipe", "EDMCFG", "drop_labels"]


@dataclass(frozen=True)
class EDMCFGRecipe(EDMRecipe):
    """EDMRecipe plus p_uncond, the label-dropout probability (Ho & Salimans 2022 use 0.1 or 0.2)."""

    p_uncond: float = 0.1

    def check(self) -> None:
        super().check()
        _finite("p_uncond", self.p_uncond)
        if not 0 <= self.p_uncond <= 1:
            raise ValueError(f"p_uncond must lie in [0, 1], got {self.p_uncond}")


def drop_labels(labels: torch.Tensor, p: float, null_label: int, generator=None) -> torch.Tensor:
    """Each label replaced by null_label with probability p (Ho & Salimans 2022, Algorithm 1, line 3)."""
    dev = generator.device if generator is not None else torch.device("cpu")
    drop = (torch.rand(labels.shape, generator=generator, device=dev) < p).to(labels.device)
    return torch.where(drop, torch.full_like(labels, null_label), labels)


class EDMCFG(EDM):
    name, title, recipe_cls, is_teacher = "edm-cfg", "EDM teacher (conditional, CFG)", EDMCFGRecipe, True
    needs_labels = True
    profiles = {"toy2d": {p: dict(v, p_uncond=0.2) for p, v in EDM.profiles["toy2d"].items()}}

    def loss(self, recipe, teacher):
        def loss_fn(D, batch, ctx):
            x0, labels = batch
            labels = drop_labels(labels, recipe.p_uncond, null_label_of(D), ctx.generator)
            return edm_loss(D, x0, generator=ctx.generator, cond=labels, p_mean=recipe.p_mean, p_std=recipe.p_std,
                            sigma_data=recipe.sigma_data)
        return loss_fn


register(EDMCFG())
