"""Class-conditional teachers for classifier-free guidance: "edm-cfg" and "ddpm-cfg".

Ho & Salimans 2022 (Algorithm 1): one network learns the conditional and the unconditional
denoiser at once, by replacing each training label with the "no label" token (the nets' label
slot num_classes) with probability p_uncond. The loss is EDM's (Karras et al. 2022, eq. 8) on
the labelled batch; sampling is Heun (EDM Algorithm 1) and needs ``cond`` (labels), guided or
not (``guidance.CFGDenoiser``). It may serve as the teacher of LCM (``methods/lcm.py``).

"ddpm-cfg" is the same label dropout on a DDPM epsilon-network on DDPM's discrete schedule (Ho et
al. 2020, L_simple eq. 14 with the label as input), the teacher LCM distils in Stable Diffusion's
setting (Luo et al. 2023, sec. 4.2-4.3). It is a denoiser through ``precond.DiscreteEpsDenoiser``;
its default sampler is DDIM (Song et al. 2021, eq. 12 with eta = 0), which in sigma-space is the
Euler step on the DDIM grid ``DiscreteSchedule.ddim_sigmas`` (50 steps), guided by wrapping the
model in ``guidance.CFGDenoiser(model, w, null_label)``: the guided epsilon (1 + w) eps(c) - w eps(∅)
of LCM eq. 9 (diffusers' DDIMScheduler with guidance_scale = 1 + w, ``tests/test_latent_lcm.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..guidance import null_label_of
from ..losses.denoising import ddpm_loss, edm_loss
from ..precond import DiscreteEpsDenoiser
from ..recipes import _finite
from ..schedules import alphas_cumprod
from . import register
from .diffusion import DDPM, EDM, DDPMRecipe, EDMRecipe

__all__ = ["EDMCFGRecipe", "EDMCFG", "DDPMCFGRecipe", "DDPMCFG", "GuidedEpsDenoiser", "drop_labels"]


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


@dataclass(frozen=True)
class DDPMCFGRecipe(DDPMRecipe):
    """DDPMRecipe plus p_uncond (label dropout) and sample_steps, the DDIM steps of the default sampler."""

    p_uncond: float = 0.1
    sample_steps: int = 50  # DDIM steps (Stable Diffusion's and LCM's 50-step DDIM baseline)

    def check(self) -> None:
        super().check()
        _finite("p_uncond", self.p_uncond)
        if not 0 <= self.p_uncond <= 1:
            raise ValueError(f"p_uncond must lie in [0, 1], got {self.p_uncond}")
        if not isinstance(self.sample_steps, int) or not 1 <= self.sample_steps <= self.num_timesteps:
            raise ValueError(f"sample_steps must be an integer in [1, num_timesteps], got {self.sample_steps!r}")


class GuidedEpsDenoiser(DiscreteEpsDenoiser):
    """A DiscreteEpsDenoiser whose epsilon-network is also ``.net``, as in Precond.

    What ``guidance.null_label_of`` (the teacher's "no label") and ``methods.base.copy_teacher_net``
    (a student started from the teacher's weights) look for. Same state dict as DiscreteEpsDenoiser.
    """

    @property
    def net(self):
        return self.eps_model


# cifar10-latent: the latent U-Net of the domain; smoke: seconds; cpu: about 4 minutes on 2 shared cores
# (README, "Latent consistency models"); gpu: not yet measured.
_LATENT = {"smoke": dict(steps=20), "cpu": dict(steps=2000, lr=2e-3), "gpu": dict(steps=100_000, lr=2e-4)}


class DDPMCFG(DDPM):
    name, title, recipe_cls, is_teacher = "ddpm-cfg", "DDPM teacher (conditional, CFG)", DDPMCFGRecipe, True
    needs_labels = True
    profiles = {"toy2d": {p: dict(v, p_uncond=0.2) for p, v in DDPM.profiles["toy2d"].items()},
                "cifar10": {p: dict(v, p_uncond=0.1) for p, v in DDPM.profiles["cifar10"].items()},
                "cifar10-latent": {p: dict(v, p_uncond=0.1) for p, v in _LATENT.items()}}

    def build(self, recipe, net):
        return GuidedEpsDenoiser(net, alphas_cumprod(recipe.schedule, recipe.num_timesteps))

    def loss(self, recipe, teacher):
        def loss_fn(model, batch, ctx):
            if not isinstance(model, DiscreteEpsDenoiser):
                raise ValueError("ddpm-cfg trains in one process only (not under torchrun); use edm-cfg for "
                                 "several GPUs")
            x0, labels = batch
            labels = drop_labels(labels, recipe.p_uncond, null_label_of(model), ctx.generator)
            return ddpm_loss(model.eps_model, x0, model.schedule.alphas_cumprod, generator=ctx.generator,
                             cond=labels)
        return loss_fn

    def sampler(self, recipe):
        return "euler"  # DDIM (eta = 0) on the DDIM grid

    def default_steps(self, recipe):
        return recipe.sample_steps

    def sigmas(self, recipe, steps=None):
        return self.schedule(recipe).ddim_sigmas(steps or recipe.sample_steps)


register(EDMCFG())
register(DDPMCFG())
