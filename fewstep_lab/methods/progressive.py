"""Progressive distillation (Salimans & Ho 2022, "PD"): halve a sampler's steps, round after round.

A PD student is a denoiser D = Precond(F, EDM scalings) sampled with Euler (= DDIM) on the
N-step grid ``pd_sigmas(N)``; each round trains it with ``losses.progressive.pd_loss`` (PD
Algorithm 2: one student step per two teacher Euler steps) starting from its teacher's weights,
and the student becomes the next teacher. The final student is saved at the run's checkpoint
path, round N's at ``<stem>.<N>steps<suffix>`` beside it (``round_path``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from ..losses.progressive import pd_loss, pd_sigmas, progressive_distillation_rounds
from ..precond import Precond, get_scalings
from ..recipes import NoiseRecipe, ema_schedule
from . import register
from .base import Method, copy_teacher_net, tagged_path

__all__ = ["PDRecipe", "PD", "round_path"]


@dataclass(frozen=True)
class PDRecipe(NoiseRecipe):
    """PD from teacher_steps down to student_steps (a power-of-two ratio); `steps` optimiser steps PER ROUND.

    Toy cpu profile (64 -> 1 in 6 rounds of 600 steps, EMA 0.99) on 8 gaussians: 1 Euler step
    0.0168 ± 0.0018 sliced W2 (floor 0.0136 ± 0.0009), about 20 s of training per round.
    """

    teacher_steps: int = 64
    student_steps: int = 1
    weighting: str = "truncated_snr"
    init_from_teacher: bool = True

    def choices(self) -> dict:
        return {**super().choices(), "weighting": ("truncated_snr", "uniform")}

    def check(self) -> None:
        super().check()
        ratio = self.teacher_steps // max(self.student_steps, 1)
        exact = ratio * self.student_steps == self.teacher_steps
        if self.student_steps < 1 or ratio < 2 or not exact or ratio & (ratio - 1):
            raise ValueError(f"teacher_steps / student_steps must be a power of two >= 2, got "
                             f"{self.teacher_steps} / {self.student_steps}")


def round_path(path, student_steps: int, recipe: PDRecipe):
    """Where the round that ends with `student_steps` is saved: the run's path for the final student."""
    return path if student_steps == recipe.student_steps else tagged_path(path, f"{student_steps}steps")


class PD(Method):
    name, title, recipe_cls, teacher = "pd", "PD", PDRecipe, "denoiser"
    profiles = {
        "toy2d": {"smoke": dict(steps=20, teacher_steps=4), "cpu": dict(steps=600, ema_decay=0.99),
                  "gpu": dict(steps=2000, ema_decay=0.995)},
        # Not yet measured on images.
        "cifar10": {"smoke": dict(steps=4, teacher_steps=4), "cpu": dict(steps=100, teacher_steps=16),
                    "gpu": dict(steps=20_000, teacher_steps=256)},
    }

    def prepare(self, recipe, teacher):
        return recipe if isinstance(teacher, nn.Module) else replace(recipe, init_from_teacher=False)

    def build(self, recipe, net):
        return Precond(net, get_scalings("edm", sigma_data=recipe.sigma_data))

    def fit(self, recipe, build_model, teacher, train_once):
        """PD Algorithm 2's rounds; returns the final student and its state (.seconds = all rounds)."""
        states = {}

        def make_student(t):
            model = build_model()
            # Later rounds start from the previous student; round 1 from the original teacher only
            # with init_from_teacher (the exact mixture denoiser has no weights).
            if t is not teacher or recipe.init_from_teacher:
                copy_teacher_net(model, t)
            return model

        def train_round(student, t, sigmas):
            n = (len(sigmas) - 1) // 2

            def loss_fn(model, x0, ctx):
                return pd_loss(model, t, x0, sigmas=sigmas, generator=ctx.generator, weighting=recipe.weighting)

            states[n] = train_once(student, loss_fn, {"ema": ema_schedule(recipe)},
                                   recipe=replace(recipe, student_steps=n),
                                   tag=None if n == recipe.student_steps else f"{n}steps")
            return states[n].emas["ema"].eval().requires_grad_(False)

        students = progressive_distillation_rounds(
            teacher, train_round, make_student=make_student, teacher_steps=recipe.teacher_steps,
            student_steps=recipe.student_steps, sigma_min=recipe.sigma_min, sigma_max=recipe.sigma_max,
            rho=recipe.rho)
        final = states[recipe.student_steps]
        final.seconds = sum(s.seconds for s in states.values())
        return students[recipe.student_steps], final

    def checkpoint_for(self, path, recipe, steps):
        """Round `steps`'s student when PD trained one (steps = student_steps * 2^k <= teacher_steps / 2)."""
        ratio = steps // recipe.student_steps
        if steps * 2 <= recipe.teacher_steps and ratio * recipe.student_steps == steps and not ratio & (ratio - 1):
            return round_path(path, steps, recipe)
        return path

    def sampler(self, recipe):
        return "euler"

    def default_steps(self, recipe):
        return recipe.student_steps

    def sigmas(self, recipe, steps=None):
        return pd_sigmas(steps or recipe.student_steps, recipe.sigma_min, recipe.sigma_max, recipe.rho)


register(PD())
