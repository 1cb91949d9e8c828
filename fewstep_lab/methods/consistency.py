"""Consistency models: distillation (CD), training (CT) and improved training (iCT).

Song, Dhariwal, Chen & Sutskever 2023 ("CM"): f(x, sigma) = c_skip x + c_out F with the
boundary condition f(x, sigma_min) = x (appendix C; ``precond.consistency_scalings``), CD is
Algorithm 2 (a teacher's ODE step between neighbouring levels, EMA target mu), CT is
Algorithm 3 (the data point as teacher; N(k) and mu(k) of appendix C), sampling is
Algorithm 1 (one step, or re-noise and apply f again). Song & Dhariwal 2023 ("iCT"): the
exponential curriculum N(k), lognormal levels, pseudo-Huber distance, lambda = 1/(sigma_{n+1} -
sigma_n) and no EMA target. The losses are ``losses.consistency``; this module only wires them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..losses.consistency import cd_loss, ct_loss, ct_mu, ct_N, get_distance, ict_N
from ..precond import Precond, get_scalings
from ..recipes import NoiseRecipe, _finite, ema_schedule
from ..schedules import karras_sigmas
from . import register
from .base import Method, copy_teacher_net

__all__ = ["ConsistencyRecipe", "CDRecipe", "CTRecipe", "ICTRecipe", "CD", "CT", "ICT", "consistency_sigmas"]

_DISTANCES = ("l2", "l1", "pseudo_huber")


@dataclass(frozen=True)
class ConsistencyRecipe(NoiseRecipe):
    """Fields shared by CD, CT and iCT: the distance, the weighting lambda, how levels are drawn.

    multistep_sigma_min is the lowest level of the default multistep sampling grid (EDM's
    rho-ramp from sigma_max down to it): 0.8 is about what CM and iCT report for CIFAR-10; the
    toy tables use 0.25 (a search with sampling.search_consistency_sigmas on the cpu-profile
    8-gaussians models put the 2-step level at 0.24-0.33; 0.5 and 1.0 were 5-20 % worse).
    """

    distance: str = "l2"
    huber_c: float | None = None  # None: iCT's 0.00054 sqrt(dim)
    weighting: str = "uniform"
    index_sampling: str = "uniform"
    p_mean: float = -1.1
    p_std: float = 2.0
    multistep_sigma_min: float = 0.8

    def choices(self) -> dict:
        return {**super().choices(), "distance": _DISTANCES, "weighting": ("uniform", "ict"),
                "index_sampling": ("uniform", "lognormal")}

    def check(self) -> None:
        super().check()
        if self.huber_c is not None and self.distance != "pseudo_huber":
            raise ValueError("huber_c is the pseudo-Huber constant: set distance='pseudo_huber' or huber_c=None")
        if self.huber_c is not None:
            _finite("huber_c", self.huber_c, positive=True)
        _finite("multistep_sigma_min", self.multistep_sigma_min, positive=True)
        if not self.sigma_min <= self.multistep_sigma_min < self.sigma_max:
            raise ValueError("multistep_sigma_min must lie in [sigma_min, sigma_max)")

    def loss_kwargs(self) -> dict:
        distance = get_distance("pseudo_huber", c=self.huber_c) if self.distance == "pseudo_huber" else self.distance
        return dict(distance=distance, weighting=self.weighting, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                    rho=self.rho, index_sampling=self.index_sampling, p_mean=self.p_mean, p_std=self.p_std)


@dataclass(frozen=True)
class CDRecipe(ConsistencyRecipe):
    """CD (CM Algorithm 2): CM's CIFAR-10 choices N = 18, Heun, target EMA mu = 0.95; student from the teacher.

    Toy cpu profile on 8 gaussians (1,500 steps, ~60 s): 1 step 0.0195 ± 0.0018 sliced W2, 1.1x the
    teacher's Heun-35 (README, "The seed table"). LPIPS (CM's best) needs weights that cannot be
    downloaded here: l2 on 2-D, pseudo-Huber on images.
    """

    N: int = 18
    solver: str = "heun"
    target_decay: float = 0.95
    init_from_teacher: bool = True

    def choices(self) -> dict:
        return {**super().choices(), "solver": ("euler", "heun")}

    def check(self) -> None:
        super().check()
        if not isinstance(self.N, int) or self.N < 2:
            raise ValueError(f"N must be an integer >= 2, got {self.N!r}")
        _finite("target_decay", self.target_decay)
        if not 0 <= self.target_decay <= 1:
            raise ValueError(f"target_decay must lie in [0, 1], got {self.target_decay}")


@dataclass(frozen=True)
class CTRecipe(ConsistencyRecipe):
    """CT (CM Algorithm 3) from scratch with N(k), mu(k) of CM appendix C; defaults are CM's CIFAR-10 constants.

    The toy tables keep them but for mu0 = 0.01: with CM's mu0 = 0.9, CT collapses to one blob on
    2-D data within a few thousand steps (`python scripts/sweep_ct_mu0.py --dataset D`; README,
    "The seed table": 1-step sliced W2 0.44 with mu0 = 0.9 against 0.062 with 0.01 on 8 gaussians).
    """

    s0: int = 2
    s1: int = 150
    mu0: float = 0.9

    def check(self) -> None:
        super().check()
        if not 0 < self.mu0 < 1:
            raise ValueError(f"mu0 must lie in (0, 1) (CM appendix C); for mu = 0 use ict, got {self.mu0}")
        if not 2 <= self.s0 <= self.s1:
            raise ValueError(f"need 2 <= s0 <= s1, got s0={self.s0}, s1={self.s1}")


@dataclass(frozen=True)
class ICTRecipe(ConsistencyRecipe):
    """iCT (Song & Dhariwal 2023): s0 = 10, s1 = 1280, pseudo-Huber, lambda = 1/(sigma_{n+1}-sigma_n), lognormal levels.

    Toy cpu profile (s1 = 160, 3,000 steps, EMA 0.995) on 8 gaussians, three training seeds: 1 step
    0.037, 2 steps 0.018 sliced W2 (2.7x and 1.3x the floor 0.0136).
    """

    s0: int = 10
    s1: int = 1280
    distance: str = "pseudo_huber"
    weighting: str = "ict"
    index_sampling: str = "lognormal"

    def check(self) -> None:
        super().check()
        if not 2 <= self.s0 <= self.s1:
            raise ValueError(f"need 2 <= s0 <= s1, got s0={self.s0}, s1={self.s1}")


def consistency_sigmas(recipe: ConsistencyRecipe, steps: int = 1) -> torch.Tensor:
    """CM Algorithm 1's grid: [sigma_max, 0] for one step, else the rho-ramp down to multistep_sigma_min, then 0."""
    if steps == 1:
        return torch.tensor([recipe.sigma_max, 0.0], dtype=torch.float64)
    return karras_sigmas(steps, recipe.multistep_sigma_min, recipe.sigma_max, recipe.rho).double()


_TOY = dict(multistep_sigma_min=0.25)
_CT_TOY_MU0 = 0.01  # scripts/sweep_ct_mu0.py; see CTRecipe


class _Consistency(Method):
    """What CD, CT and iCT share: the model f = Precond(F, consistency scalings) and Algorithm 1."""

    def build(self, recipe, net):
        return Precond(net, get_scalings("consistency", sigma_data=recipe.sigma_data, sigma_min=recipe.sigma_min))

    def sampler(self, recipe):
        return "consistency"

    def sigmas(self, recipe, steps=None):
        return consistency_sigmas(recipe, steps or 1)

    def sampler_kwargs(self, recipe):
        return {"sigma_min": recipe.sigma_min}


class CD(_Consistency):
    name, title, recipe_cls, teacher = "cd", "CD", CDRecipe, "denoiser"
    profiles = {
        "toy2d": {"smoke": dict(_TOY, steps=60), "cpu": dict(_TOY, steps=1500, ema_decay=0.99),
                  "gpu": dict(_TOY, steps=6000, ema_decay=0.995)},
        # About 3 minutes on 2 cores in the cpu profile; gpu: 100k steps (0.13x CM's 800k), not yet measured.
        "cifar10": {"smoke": dict(steps=8, distance="pseudo_huber"),
                    "cpu": dict(steps=300, lr=5e-4, distance="pseudo_huber"),
                    "gpu": dict(steps=100_000, lr=4e-4, distance="pseudo_huber")},
    }

    def prepare(self, recipe, teacher):
        # The exact mixture denoiser has no weights to start from.
        return recipe if isinstance(teacher, nn.Module) else replace(recipe, init_from_teacher=False)

    def init_from_teacher(self, recipe, model, teacher):
        if recipe.init_from_teacher:
            copy_teacher_net(model, teacher)

    def loss(self, recipe, teacher):
        kwargs = recipe.loss_kwargs()

        def loss_fn(f, x0, ctx):
            return cd_loss(f, ctx.emas["target"], teacher, x0, N=recipe.N, solver=recipe.solver,
                           generator=ctx.generator, **kwargs)
        return loss_fn

    def ema_decays(self, recipe):
        return {"target": recipe.target_decay, "ema": ema_schedule(recipe)}


class CT(_Consistency):
    name, title, recipe_cls = "ct", "CT", CTRecipe
    profiles = {
        "toy2d": {"smoke": dict(_TOY, steps=60, mu0=_CT_TOY_MU0),
                  "cpu": dict(_TOY, steps=3000, ema_decay=0.995, mu0=_CT_TOY_MU0),
                  "gpu": dict(_TOY, steps=12000, ema_decay=0.999, mu0=_CT_TOY_MU0)},
        # Not yet measured on images: iCT's budgets.
        "cifar10": {"smoke": dict(steps=8), "cpu": dict(steps=600), "gpu": dict(steps=200_000, lr=1e-4)},
    }

    def loss(self, recipe, teacher):
        kwargs = recipe.loss_kwargs()

        def loss_fn(f, x0, ctx):
            N = ct_N(ctx.step, max(ctx.steps, 1), recipe.s0, recipe.s1)
            return ct_loss(f, ctx.emas["target"], x0, N=N, generator=ctx.generator, **kwargs)
        return loss_fn

    def ema_decays(self, recipe):
        K = max(recipe.steps, 1)
        return {"target": lambda k: ct_mu(k, K, recipe.s0, recipe.s1, recipe.mu0), "ema": ema_schedule(recipe)}


class ICT(_Consistency):
    name, title, recipe_cls = "ict", "iCT", ICTRecipe
    profiles = {
        "toy2d": {"smoke": dict(_TOY, steps=60), "cpu": dict(_TOY, steps=3000, ema_decay=0.995, s1=160),
                  "gpu": dict(_TOY, steps=6000, ema_decay=0.995, s1=160)},
        # About 3.5 minutes on 2 cores in the cpu profile; gpu: 200k steps at batch 512 (CM's CT: 800k at
        # 2048), dropout 0.3 as iCT; not yet measured.
        "cifar10": {"smoke": dict(steps=8), "cpu": dict(steps=600, s1=160),
                    "gpu": dict(steps=200_000, lr=1e-4, dropout=0.3)},
    }

    def loss(self, recipe, teacher):
        kwargs = recipe.loss_kwargs()

        def loss_fn(f, x0, ctx):
            # The target is the student itself under stop-gradient (iCT sec. 3.2: mu = 0).
            N = ict_N(ctx.step, max(ctx.steps, 1), recipe.s0, recipe.s1)
            return ct_loss(f, f, x0, N=N, generator=ctx.generator, **kwargs)
        return loss_fn


register(CD())
register(CT())
register(ICT())
