"""Latent consistency models (Luo et al. 2023, "LCM"): LCD of a guided teacher into a w-conditioned student.

The student f(x, sigma, (c, w)) = Precond(F, LCM scalings) (``precond.lcm_scalings``: LCM's
boundary condition, sigma_data = 0.5, timestep scaling 10, on top of EDM's x0 parametrisation)
takes the guidance scale w through a sinusoidal embedding added to the noise embedding (LCM sec.
4.2; ``nets.mlp`` ``guidance_embed``). Training is LCM Algorithm 1 (``losses.lcm.lcd_loss``: w ~
U[w_min, w_max], skipping step k, one step of the guided teacher's ODE with the samplers' own
step function, EMA target mu = 0.95); sampling is LCM's multistep sampler (``sampling.sample_lcm``)
with cond = (labels, w). The teacher must be class-conditional: an "edm-cfg" checkpoint, or the
exact denoiser of a labelled mixture (``--teacher exact`` on e.g. 8gaussians-4class).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..guidance import null_label_of
from ..losses.consistency import get_distance
from ..losses.lcm import lcd_loss
from ..precond import Precond, get_scalings
from ..recipes import NoiseRecipe, _finite, ema_schedule
from . import register
from .base import Method, copy_teacher_net
from .consistency import consistency_sigmas
from .guided import drop_labels

__all__ = ["LCMRecipe", "LCM", "LabelsOnly"]


@dataclass(frozen=True)
class LCMRecipe(NoiseRecipe):
    """LCD's choices. Defaults: LCM's (diffusers' train_lcm_distill_sd_wds.py: guidance scales 5-15 in
    diffusers' convention, i.e. w in [4, 14] here; 50 DDIM levels from a 1000-step grid, i.e. N = 1000,
    k = 20; DDIM = Euler; target EMA 0.95; timestep scaling 10; l2). Toy values: see LCM.profiles
    (not tuned yet)."""

    N: int = 1000
    k: int = 20
    solver: str = "euler"
    w_min: float = 4.0
    w_max: float = 14.0
    target_decay: float = 0.95
    timestep_scaling: float = 10.0
    distance: str = "l2"
    huber_c: float | None = None  # pseudo-Huber constant (None: iCT's 0.00054 sqrt(dim))
    init_from_teacher: bool = True
    multistep_sigma_min: float = 0.25  # lowest level of the default multistep grid (as CM's toy recipes)
    # "input": LCM (w an input of the student, guidance distilled); "sampling": the ablation "plain CD of
    # the unguided teacher, guided at sampling time" (w_min = w_max = 0, labels dropped with p_uncond so
    # the student also learns f(x, sigma, ∅); sampling applies CFG to the student's outputs: 2 calls/step).
    guidance: str = "input"
    p_uncond: float = 0.0  # label dropout in LCD (the "no label" token), needed by guidance="sampling"

    def choices(self) -> dict:
        return {**super().choices(), "solver": ("euler", "heun"), "distance": ("l2", "pseudo_huber"),
                "guidance": ("input", "sampling")}

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
    profiles = {"toy2d": {"smoke": dict(_TOY, steps=60), "cpu": dict(_TOY, steps=1500, ema_decay=0.99),
                          "gpu": dict(_TOY, steps=6000, ema_decay=0.995)}}

    def net_options(self, recipe):
        return {"guidance_embed": recipe.guidance == "input"}

    def build(self, recipe, net):
        scalings = get_scalings("lcm", sigma_data=recipe.sigma_data, sigma_min=recipe.sigma_min,
                                timestep_scaling=recipe.timestep_scaling)
        return Precond(net, scalings) if recipe.guidance == "input" else LabelsOnly(net, scalings)

    def prepare(self, recipe, teacher):
        null_label_of(teacher)  # the teacher must be class-conditional: a clear error now, not at step 1
        return recipe if isinstance(teacher, nn.Module) else replace(recipe, init_from_teacher=False)

    def init_from_teacher(self, recipe, model, teacher):
        if recipe.init_from_teacher:
            # Only the student's w branch (w_*) is its own (LCM starts the student from the teacher).
            copy_teacher_net(model, teacher, own_prefixes=("w_",))

    def loss(self, recipe, teacher):
        null = null_label_of(teacher)
        d = get_distance("pseudo_huber", c=recipe.huber_c) if recipe.distance == "pseudo_huber" else recipe.distance

        def loss_fn(f, batch, ctx):
            x0, labels = batch
            if recipe.p_uncond:
                labels = drop_labels(labels, recipe.p_uncond, null, ctx.generator)
            return lcd_loss(f, ctx.emas["target"], teacher, x0, labels, N=recipe.N, k=recipe.k, w_min=recipe.w_min,
                            w_max=recipe.w_max, null_label=null, solver=recipe.solver, distance=d,
                            generator=ctx.generator, sigma_min=recipe.sigma_min, sigma_max=recipe.sigma_max,
                            rho=recipe.rho)
        return loss_fn

    def ema_decays(self, recipe):
        return {"target": recipe.target_decay, "ema": ema_schedule(recipe)}

    def sampler(self, recipe):
        return "lcm"

    def sigmas(self, recipe, steps=None):
        return consistency_sigmas(recipe, steps or 1)

    def guide(self, recipe, model, labels, w=None):
        """The student takes w as an input (cond = (labels, w)): guidance costs no second evaluation."""
        if labels is None:
            raise ValueError("LCM models are class-conditional: give class labels (--label C)")
        if recipe.guidance == "sampling":  # the ablation: CFG on the student's outputs (Method.guide)
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
