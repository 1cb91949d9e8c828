"""Diffusion teachers: EDM (Karras et al. 2022) and DDPM epsilon-prediction (Ho et al. 2020).

``edm``: D = Precond(F, EDM scalings) (EDM eq. 7), trained with EDM's loss (eq. 8: lognormal
sigma, lambda = 1/c_out^2), sampled with Heun on the rho-ramp (EDM Algorithm 1; 18 steps = 35 NFE).
``ddpm``: F is an epsilon-network on DDPM's discrete timesteps, seen as a denoiser through
x_vp = x / sqrt(1 + sigma^2), D = x - sigma eps (``precond.DiscreteEpsDenoiser``), trained with
L_simple (Ho et al. 2020, eq. 14) and sampled with ancestral steps on its own T timesteps.
Both can serve as the teacher of a distillation method (CD, PD).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..losses.denoising import ddpm_loss, edm_loss
from ..precond import DiscreteEpsDenoiser, Precond, get_scalings
from ..recipes import NoiseRecipe, _finite
from ..schedules import DiscreteSchedule, alphas_cumprod, karras_sigmas
from . import register
from .base import Method

__all__ = ["EDMRecipe", "DDPMRecipe", "EDM", "DDPM"]


@dataclass(frozen=True)
class EDMRecipe(NoiseRecipe):
    """The EDM teacher: lognormal training sigma (P_mean, P_std), Heun sampling on the rho-ramp.

    Toy 2-D, cpu profile (6,000 steps, cosine lr): Heun-35 sliced W2 0.0176 ± 0.0031 on 8 gaussians
    against a data-vs-data floor of 0.0136 ± 0.0009 (README, "Toy teachers").
    """

    p_mean: float = -1.2
    p_std: float = 1.2
    sample_steps: int = 18  # Heun steps of the default sampler (EDM: 18 = 35 NFE on CIFAR-10)

    def check(self) -> None:
        super().check()
        _finite("p_mean", self.p_mean)
        _finite("p_std", self.p_std, positive=True)
        if not isinstance(self.sample_steps, int) or self.sample_steps < 1:
            raise ValueError(f"sample_steps must be an integer >= 1, got {self.sample_steps!r}")


@dataclass(frozen=True)
class DDPMRecipe(NoiseRecipe):
    """DDPM: L_simple on T discrete timesteps of a linear or cosine schedule; ancestral sampling."""

    schedule: str = "linear"
    num_timesteps: int = 1000

    def choices(self) -> dict:
        return {**super().choices(), "schedule": ("linear", "cosine")}

    def check(self) -> None:
        super().check()
        if not isinstance(self.num_timesteps, int) or self.num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an integer >= 2, got {self.num_timesteps!r}")


_TOY_TEACHER = {"smoke": dict(steps=150), "cpu": dict(steps=6000), "gpu": dict(steps=20000)}
_TOY_TEACHER = {p: dict(v, lr_schedule="cosine") for p, v in _TOY_TEACHER.items()}


class EDM(Method):
    name, title, recipe_cls, is_teacher = "edm", "EDM teacher", EDMRecipe, True
    # cifar10: about 4 minutes on 2 cores in the cpu profile; gpu: 100k steps at batch 512 = 51 Mimg
    # (0.26x EDM's 200 Mimg), wall time not yet measured.
    profiles = {
        "toy2d": _TOY_TEACHER,
        "cifar10": {"smoke": dict(steps=20), "cpu": dict(steps=1200, lr=2e-3), "gpu": dict(steps=100_000)},
    }

    def build(self, recipe, net):
        return Precond(net, get_scalings("edm", sigma_data=recipe.sigma_data))

    def loss(self, recipe, teacher):
        def loss_fn(D, x0, ctx):
            return edm_loss(D, x0, generator=ctx.generator, p_mean=recipe.p_mean, p_std=recipe.p_std,
                            sigma_data=recipe.sigma_data)
        return loss_fn

    def sampler(self, recipe):
        return "heun"

    def default_steps(self, recipe):
        return recipe.sample_steps

    def sigmas(self, recipe, steps=None):
        return karras_sigmas(steps or recipe.sample_steps, recipe.sigma_min, recipe.sigma_max, recipe.rho)


class DDPM(Method):
    name, title, recipe_cls, is_teacher = "ddpm", "DDPM", DDPMRecipe, True
    profiles = {
        "toy2d": _TOY_TEACHER,
        # Not yet measured on images: the EDM teacher's budgets.
        "cifar10": {"smoke": dict(steps=20), "cpu": dict(steps=1200, lr=2e-3), "gpu": dict(steps=100_000)},
    }

    def net_options(self, recipe):
        # The network sees the integer timestep t in [0, T): scale it to about [0, 4], the range of
        # EDM's c_noise = ln(sigma) / 4 that the networks' embeddings are tuned for.
        return {"noise_scale": 4.0 / recipe.num_timesteps}

    def schedule(self, recipe) -> DiscreteSchedule:
        return DiscreteSchedule(alphas_cumprod(recipe.schedule, recipe.num_timesteps))

    def build(self, recipe, net):
        return DiscreteEpsDenoiser(net, alphas_cumprod(recipe.schedule, recipe.num_timesteps))

    def loss(self, recipe, teacher):
        def loss_fn(model, x0, ctx):
            if not isinstance(model, DiscreteEpsDenoiser):
                # L_simple calls the epsilon-network directly, which DistributedDataParallel's
                # wrapper would bypass (no gradient averaging): refuse rather than train wrongly.
                raise ValueError("ddpm trains in one process only (not under torchrun); use edm for several GPUs")
            return ddpm_loss(model.eps_model, x0, model.schedule.alphas_cumprod, generator=ctx.generator)
        return loss_fn

    def sampler(self, recipe):
        return "ancestral"

    def default_steps(self, recipe):
        return recipe.num_timesteps  # every timestep: a DDPM network knows only its own grid

    def sigmas(self, recipe, steps=None):
        return self.schedule(recipe).ddim_sigmas(steps or recipe.num_timesteps)


register(EDM())
register(DDPM())
