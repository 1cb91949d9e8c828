"""Latent consistency models (Luo et al. 2023, "LCM"): LCD of a guided teacher into a w-conditioned student.

The student f(x, sigma, (c, w)) = Precond(F, LCM scalings) (``precond.lcm_scalings``: LCM's
boundary condition, sigma_data = 0.5, timestep scaling 10, on top of EDM's x0 parametrisation)
takes the guidance scale w through a sinusoidal embedding added to the noise embedding (LCM sec.
4.2; ``nets.mlp`` ``guidance_embed``). Training is LCM Algorithm 1 (``losses.lcm.lcd_loss``: w ~
U[w_min, w_max], skipping step k, one step of the guided teacher's ODE with the samplers' own
step function, EMA target mu = 0.95); sampling is LCM's multistep sampler (``sampling.sample_lcm``)
with cond = (labels, w). The teacher must be class-conditional: an "edm-cfg" or "ddpm-cfg"
checkpoint, or the exact denoiser of a labelled mixture (``--teacher exact`` on e.g. 8gaussians-4class).

A DDPM teacher ("ddpm-cfg", Stable Diffusion's setting) is distilled as LCM does it, on its own
discrete schedule: the levels are the teacher's T sigmas (N = T), the skipping step k counts
timesteps (LCM: k = 20 of 1000, DDIM's 50-step grid), and the student keeps the teacher's
parametrisation, f = b_skip(t) x + b_out(t) (x - sigma eps(x / sqrt(1 + sigma^2), t, (c, w))) with LCM's
boundary scalings of the timestep t = t(sigma) (``lcm_eps_scalings``; LCM sec. 4.1, diffusers'
``LCMScheduler.get_scalings_for_boundary_condition_discrete``), so a student copied from the teacher
starts as the teacher's conditional x0 prediction, and f(x, sigma_min) = x exactly at the
teacher's lowest level. Its multistep grid is LCMScheduler's timesteps (``lcm_timesteps``). ``prepare``
reads all of this from the teacher (``ddpm_schedule``, N, sigma_min, sigma_max); an EDM teacher keeps
the rho-ramp path above.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..guidance import null_label_of
from ..losses.consistency import cm_sigmas, get_distance
from ..losses.lcm import lcd_loss
from ..precond import DiscreteEpsDenoiser, Precond, get_scalings
from ..recipes import NoiseRecipe, _finite, ema_schedule
from ..schedules import DiscreteSchedule, alphas_cumprod
from . import register
from .base import Method, copy_teacher_net
from .consistency import consistency_sigmas
from .guided import drop_labels

__all__ = ["LCMStudentRecipe", "LCMRecipe", "LCM", "lcm_eps_scalings", "lcm_timesteps", "teacher_grid", "ddpm_schedule_of", "LabelsOnly"]


def lcm_eps_scalings(sigma: torch.Tensor, *, schedule: DiscreteSchedule, sigma_data: float = 0.5,
                     timestep_scaling: float = 10.0):
    """LCM's consistency function on a DDPM eps-network (LCM sec. 4.1), as Precond scalings in sigma-space.

    f = b_skip x + b_out x0_hat with x0_hat = x - sigma eps(c_in x, t) (EDM table 1, VP), c_in =
    1/sqrt(1 + sigma^2), the network fed the (fractional) DDPM timestep t = t(sigma), and LCM's
    b_skip = sigma_data^2 / ((s t)^2 + sigma_data^2), b_out = s t / sqrt((s t)^2 + sigma_data^2)
    (s = timestep_scaling): c_skip = b_skip + b_out, c_out = -b_out sigma. LCM applies b_skip to
    the VP sample x / sqrt(1 + sigma^2); here it acts on x, so that f(x, sigma_min) = x holds in
    sigma-space. The two differ by the factor sqrt(1 + sigma^2) on a term that b_skip makes tiny
    wherever they differ (b_skip(t = 1) = 0.0025, and sqrt(1 + sigma^2) - 1 < 1e-4 at t = 1 on DDPM's
    linear schedule).
    """
    t = schedule.t_of_sigma(sigma)  # float64, exactly 0 at and below the teacher's lowest level
    # The lowest level rounded to sigma's dtype may sit an ulp above the float64 table value: still t = 0.
    t = torch.where(sigma <= torch.tensor(schedule.sigma_min, dtype=sigma.dtype, device=sigma.device),
                    torch.zeros_like(t), t)
    st = timestep_scaling * t
    b_skip = sigma_data**2 / (st**2 + sigma_data**2)  # exactly 1 at t = 0
    b_out = st / (st**2 + sigma_data**2).sqrt()  # exactly 0 at t = 0
    s64 = sigma.to(torch.float64)
    c_skip, c_out, c_in = b_skip + b_out, -b_out * s64, 1 / (s64**2 + 1).sqrt()
    return tuple(c.to(sigma.dtype) for c in (c_skip, c_out, c_in, t))


def lcm_timesteps(steps: int, num_timesteps: int = 1000, original_steps: int = 50) -> torch.Tensor:
    """LCM's multistep timesteps (diffusers' LCMScheduler.set_timesteps): `steps` of the distillation grid.

    The grid is k (i + 1) - 1 for i < original_steps, k = num_timesteps // original_steps (LCM:
    19, 39, ..., 999); `steps` roughly evenly spaced ones are taken from the top (4 steps: 999, 759, 499, 259).
    """
    if not isinstance(steps, int) or not 1 <= steps <= original_steps:
        raise ValueError(f"steps must be an integer in [1, {original_steps}] (the distillation grid's levels), "
                         f"got {steps!r}")
    k = num_timesteps // original_steps
    origin = (torch.arange(1, original_steps + 1) * k - 1).flip(0)
    idx = torch.floor(torch.linspace(0, original_steps, steps + 1, dtype=torch.float64)[:-1]).long()
    return origin[idx]


def ddpm_schedule_of(D) -> tuple[str, int] | None:
    """(schedule name, T) of a DDPM teacher (a DiscreteEpsDenoiser on a linear or cosine schedule), else None."""
    if not isinstance(D, DiscreteEpsDenoiser):
        return None
    ac = D.schedule.alphas_cumprod
    for kind in ("linear", "cosine"):
        if torch.allclose(alphas_cumprod(kind, len(ac)), ac, rtol=0, atol=1e-12):
            return kind, len(ac)
    raise ValueError("LCM distils a DDPM teacher on DDPM's linear or cosine schedule; this one has neither")


def teacher_grid(recipe) -> torch.Tensor:
    """The N ascending float64 levels LCD draws from: the DDPM teacher's sigmas, or EDM's rho-ramp (cm_sigmas)."""
    if recipe.ddpm_schedule is not None:
        return DiscreteSchedule(alphas_cumprod(recipe.ddpm_schedule, recipe.N)).sigmas
    return cm_sigmas(recipe.N, recipe.sigma_min, recipe.sigma_max, recipe.rho)


@dataclass(frozen=True)
class LCMStudentRecipe(NoiseRecipe):
    """What every trainer of a w-conditioned LCM student shares (LCD here, LCF in ``methods/lcf.py``): the
    grid (N levels, or a DDPM teacher's), the skipping step k, the w range, the EMA target, the boundary
    scalings' timestep scaling, the distance, and the default multistep grid."""

    N: int = 1000
    k: int = 20
    w_min: float = 4.0
    w_max: float = 14.0
    target_decay: float = 0.95
    timestep_scaling: float = 10.0
    distance: str = "l2"
    huber_c: float | None = None  # pseudo-Huber constant (None: iCT's 0.00054 sqrt(dim))
    multistep_sigma_min: float = 0.25  # lowest level of the default multistep grid (EDM teacher)
    # None: an EDM teacher (the rho-ramp grid). 'linear' | 'cosine': a DDPM teacher's discrete grid of
    # N = T levels, set by prepare() from the teacher with its sigma_min and sigma_max.
    ddpm_schedule: str | None = None

    def choices(self) -> dict:
        return {**super().choices(), "distance": ("l2", "pseudo_huber"), "ddpm_schedule": (None, "linear", "cosine")}

    def check(self) -> None:
        super().check()
        if not isinstance(self.N, int) or self.N < 2:
            raise ValueError(f"N must be an integer >= 2, got {self.N!r}")
        if not isinstance(self.k, int) or not 1 <= self.k < self.N:
            raise ValueError(f"the skipping step k must be an integer in [1, N), got {self.k!r}")
        for name in ("w_min", "w_max", "target_decay", "timestep_scaling", "multistep_sigma_min"):
            _finite(name, getattr(self, name))
        if not self.w_min <= self.w_max:
            raise ValueError(f"need w_min <= w_max, got {self.w_min} and {self.w_max}")
        if not 0 <= self.target_decay <= 1:
            raise ValueError(f"target_decay must lie in [0, 1], got {self.target_decay}")
        if self.huber_c is not None and self.distance != "pseudo_huber":
            raise ValueError("huber_c is the pseudo-Huber constant: set distance='pseudo_huber' or huber_c=None")
        if not self.sigma_min <= self.multistep_sigma_min < self.sigma_max:
            raise ValueError("multistep_sigma_min must lie in [sigma_min, sigma_max)")
        if self.ddpm_schedule is not None:
            grid = teacher_grid(self)
            if not (math.isclose(self.sigma_min, float(grid[0]), rel_tol=1e-12)
                    and math.isclose(self.sigma_max, float(grid[-1]), rel_tol=1e-12)):
                raise ValueError(f"with ddpm_schedule={self.ddpm_schedule!r} (N={self.N}) sigma_min and sigma_max are "
                                 f"the teacher's ({float(grid[0]):.6g}, {float(grid[-1]):.6g}); they are set from the "
                                 "teacher: do not set them")

    def distance_fn(self):
        return get_distance("pseudo_huber", c=self.huber_c) if self.distance == "pseudo_huber" else self.distance


@dataclass(frozen=True)
class LCMRecipe(LCMStudentRecipe):
    """LCD's choices. Defaults: LCM's (diffusers' train_lcm_distill_sd_wds.py: guidance scales 5-15 in
    diffusers' convention, i.e. w in [4, 14] here; 50 DDIM levels from a 1000-step grid, i.e. N = 1000,
    k = 20; DDIM = Euler; target EMA 0.95; timestep scaling 10; l2). Toy values: see LCM.profiles."""

    solver: str = "euler"
    init_from_teacher: bool = True
    # "input": LCM (w an input of the student, guidance distilled); "sampling": the ablation "plain CD of
    # the unguided teacher, guided at sampling time" (w_min = w_max = 0, labels dropped with p_uncond so
    # the student also learns f(x, sigma, ∅); sampling applies CFG to the student's outputs: 2 calls/step).
    guidance: str = "input"
    p_uncond: float = 0.0  # label dropout in LCD (the "no label" token), needed by guidance="sampling"

    def choices(self) -> dict:
        return {**super().choices(), "solver": ("euler", "heun"), "guidance": ("input", "sampling")}

    def check(self) -> None:
        super().check()
        _finite("p_uncond", self.p_uncond)
        if not 0 <= self.p_uncond <= 1:
            raise ValueError(f"p_uncond must lie in [0, 1], got {self.p_uncond}")
        if self.guidance == "sampling" and (self.w_min != 0 or self.w_max != 0 or self.p_uncond == 0):
            raise ValueError("guidance='sampling' distils the unguided teacher: set w_min = w_max = 0 and "
                             "p_uncond > 0 (the student must learn the unconditional output too)")


class LCM(Method):
    name, title, recipe_cls, teacher = "lcm", "LCM", LCMRecipe, "denoiser"
    needs_labels = True
    _TOY = dict(N=100, k=5, w_min=0.0, w_max=7.0, multistep_sigma_min=0.25)
    # Images (a ddpm-cfg teacher: N = 1000, k = 20 as LCM): w in [0, 4] (the course evaluates w = 0, 1, 3).
    # cifar10-latent cpu: about 3 minutes on 2 shared cores (README, "Latent consistency models"); gpu not measured.
    _IMG = dict(k=20, w_min=0.0, w_max=4.0)
    _IMAGES = {"smoke": dict(_IMG, steps=8), "cpu": dict(_IMG, steps=400, lr=5e-4),
               "gpu": dict(_IMG, steps=50_000, lr=1e-4)}
    # Toy cpu: 4,000 steps (1,500 gave LCM-4 2.5x the exact guided teacher's per-class sliced W2 at w = 3,
    # 4,000 gave 1.5x; Heun as the teacher's solver and a single-w student were worse at 1,500 steps).
    profiles = {"toy2d": {"smoke": dict(_TOY, steps=60), "cpu": dict(_TOY, steps=4000, ema_decay=0.99),
                          "gpu": dict(_TOY, steps=16000, ema_decay=0.995)},
                "cifar10": _IMAGES, "cifar10-latent": _IMAGES}

    def net_options(self, recipe):
        embed = getattr(recipe, "guidance", "input") == "input"
        if recipe.ddpm_schedule is not None:
            # The teacher's timestep input scale (methods.diffusion.DDPM.net_options), so its weights fit.
            return {"guidance_embed": embed, "noise_scale": 4.0 / recipe.N}
        return {"guidance_embed": embed}

    def build(self, recipe, net):
        wrap = Precond if getattr(recipe, "guidance", "input") == "input" else LabelsOnly
        if recipe.ddpm_schedule is not None:
            schedule = DiscreteSchedule(alphas_cumprod(recipe.ddpm_schedule, recipe.N))
            return wrap(net, functools.partial(lcm_eps_scalings, schedule=schedule, sigma_data=recipe.sigma_data,
                                               timestep_scaling=recipe.timestep_scaling))
        return wrap(net, get_scalings("lcm", sigma_data=recipe.sigma_data, sigma_min=recipe.sigma_min,
                                      timestep_scaling=recipe.timestep_scaling))

    def prepare(self, recipe, teacher):
        null_label_of(teacher)  # the teacher must be class-conditional: a clear error now, not at step 1
        ddpm = ddpm_schedule_of(teacher)
        if ddpm is not None:
            kind, T = ddpm
            if recipe.k >= T:
                raise ValueError(f"the skipping step k={recipe.k} must be below the teacher's {T} timesteps")
            # LCM distils on the teacher's own grid: its T levels and their ends.
            recipe = replace(recipe, ddpm_schedule=kind, N=T, sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max)
        elif recipe.ddpm_schedule is not None:
            raise ValueError("ddpm_schedule is set from a DDPM teacher (ddpm-cfg); this teacher is not one: "
                             "leave ddpm_schedule unset")
        return recipe if isinstance(teacher, nn.Module) else replace(recipe, init_from_teacher=False)

    def init_from_teacher(self, recipe, model, teacher):
        if recipe.init_from_teacher:
            # Only the student's w branch (w_*) is its own (LCM starts the student from the teacher).
            copy_teacher_net(model, teacher, own_prefixes=("w_",))

    def loss(self, recipe, teacher):
        null, grid, d = null_label_of(teacher), teacher_grid(recipe), recipe.distance_fn()

        def loss_fn(f, batch, ctx):
            x0, labels = batch
            if recipe.p_uncond:
                labels = drop_labels(labels, recipe.p_uncond, null, ctx.generator)
            return lcd_loss(f, ctx.emas["target"], teacher, x0, labels, N=recipe.N, k=recipe.k, w_min=recipe.w_min,
                            w_max=recipe.w_max, null_label=null, solver=recipe.solver, distance=d,
                            generator=ctx.generator, sigmas=grid)
        return loss_fn

    def ema_decays(self, recipe):
        return {"target": recipe.target_decay, "ema": ema_schedule(recipe)}

    def sampler(self, recipe):
        return "lcm"

    def sigmas(self, recipe, steps=None):
        if recipe.ddpm_schedule is not None:
            schedule = DiscreteSchedule(alphas_cumprod(recipe.ddpm_schedule, recipe.N))
            return schedule.sigmas_for_timesteps(lcm_timesteps(steps or 1, recipe.N, recipe.N // recipe.k))
        return consistency_sigmas(recipe, steps or 1)

    def guide(self, recipe, model, labels, w=None):
        """The student takes w as an input (cond = (labels, w)): guidance costs no second evaluation."""
        if labels is None:
            raise ValueError("LCM models are class-conditional: give class labels (--label C)")
        if getattr(recipe, "guidance", "input") == "sampling":  # the ablation: CFG on the student's outputs (Method.guide)
            return super().guide(recipe, model, labels, w)
        if w is None:
            raise ValueError(f"an LCM samples at a guidance scale it was distilled for: give w (--w W) in "
                             f"[w_min, w_max] = [{recipe.w_min}, {recipe.w_max}]")
        return model, (labels, torch.full(labels.shape, float(w), dtype=torch.float32, device=labels.device))


class LabelsOnly(Precond):
    """A consistency student without a w input: takes cond = labels, or (labels, w) with w ignored (w = 0 in training)."""

    def forward(self, x, sigma, cond=None):
        return super().forward(x, sigma, cond[0] if isinstance(cond, tuple) else cond)


register(LCM())
