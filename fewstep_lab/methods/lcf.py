"""Latent consistency fine-tuning (LCF; Luo et al. 2023, "LCM", sec. 4.4): adapt a distilled LCM to new data, no teacher.

LCF starts from a distilled LCM (``init``: the path of an ``lcm`` checkpoint) and fine-tunes it on
new data by consistency TRAINING (Song et al. 2023, Algorithm 3) in the same latent space: per
sample w ~ U[w_min, w_max], a level n of the LCM's grid, x_{n+k} = x0 + sigma_{n+k} z, and
d(f(x_{n+k}, sigma_{n+k}, (c, w)), f^-(x0 + sigma_n z, sigma_n, (c, w))) with the EMA target f^-.
It is ``losses.lcm.lcd_loss`` with the data point as the (unguided) teacher,
``losses.consistency.data_teacher(x0)``: CT is CD whose teacher is the data (one Euler step of
the point-mass denoiser lands exactly on x0 + sigma_n z). The student keeps the LCM's network,
grid and boundary scalings (its recipe's structural fields are read from the checkpoint) and its
inputs: labels (the data's class indices in the LCM's label slots; an unlabelled folder trains
the "no label" slot) and w.

What w means after LCF: the CT target carries NO guidance (there is no teacher to guide), so the
loss pulls f(., (c, w)) towards the consistency function of the unguided conditional data
distribution for every w in [w_min, w_max] alike. w remains an input, and what the LCM learnt
for each w is where fine-tuning starts, but nothing in LCF keeps w's guidance effect: the longer
LCF trains, the less w changes the samples. LCM's paper does not say how w is treated in LCF.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..losses.consistency import data_teacher
from ..losses.lcm import lcd_loss
from ..recipes import _finite
from . import register
from .lcm import LCM, LCMStudentRecipe, teacher_grid

__all__ = ["LCFRecipe", "LCF", "STRUCTURE"]

# Fields that make an LCM student the function it is; LCF copies them from its init checkpoint.
STRUCTURE = ("N", "ddpm_schedule", "sigma_min", "sigma_max", "rho", "sigma_data", "timestep_scaling", "num_classes")


@dataclass(frozen=True)
class LCFRecipe(LCMStudentRecipe):
    """LCF: init (the LCM checkpoint to start from) and the LCM student's fields; CT's target EMA and k.

    num_classes (the LCM's label slots) and the grid fields (STRUCTURE) are read from ``init``.
    """

    init: str = ""
    num_classes: int | None = None

    def check(self) -> None:
        super().check()
        if not isinstance(self.init, str):
            raise ValueError(f"init must be the path of an lcm checkpoint, got {self.init!r}")
        if self.num_classes is not None:
            _finite("num_classes", self.num_classes, positive=True)


class LCF(LCM):
    name, title, recipe_cls, teacher, is_teacher = "lcf", "LCF", LCFRecipe, "none", False
    needs_labels = True  # labels when the data have them; an unlabelled folder trains the "no label" slot
    _IMG = dict(k=20, w_min=0.0, w_max=4.0)
    profiles = {"toy2d": {"smoke": dict(k=5, w_min=0.0, w_max=7.0, steps=20),
                          "cpu": dict(k=5, w_min=0.0, w_max=7.0, steps=1000, ema_decay=0.99)},
                "cifar10-latent": {"smoke": dict(_IMG, steps=6), "cpu": dict(_IMG, steps=300, lr=2e-4),
                                   "gpu": dict(_IMG, steps=20_000, lr=5e-5)},
                "cifar10": {"smoke": dict(_IMG, steps=6), "cpu": dict(_IMG, steps=300, lr=2e-4)},
                "imagefolder": {"smoke": dict(_IMG, steps=6), "cpu": dict(_IMG, steps=300, lr=2e-4),
                                "gpu": dict(_IMG, steps=20_000, lr=5e-5)}}

    # ---------------------------------------------------------------- the LCM to start from
    def init_run(self, recipe):
        """The LCM checkpoint's run (no weights loaded), or a ValueError saying what is wrong with ``init``."""
        from ..pipeline import run_from_dict
        from ..train import read_checkpoint_meta

        if not recipe.init:
            raise ValueError("lcf fine-tunes a distilled LCM: pass its checkpoint with --set init=PATH "
                             "(fewstep train --method lcm ... --out PATH)")
        path = Path(recipe.init).expanduser()
        if not path.is_file():
            raise ValueError(f"lcf: init={recipe.init} is not a file; pass the path of an lcm checkpoint")
        run = run_from_dict(read_checkpoint_meta(path).get("run"), source=str(path))
        if run.method != "lcm":
            raise ValueError(f"lcf: {recipe.init} holds a {run.method} model, not an lcm one; LCF fine-tunes a "
                             "distilled LCM (fewstep train --method lcm --teacher ...)")
        return run

    def prepare_run(self, run, domain):
        """Copy the LCM's structure (STRUCTURE) into the recipe; refuse an LCM of another latent space.

        Called by ``pipeline.train_run`` with the run's domain, before the model is built."""
        from ..pipeline import make_domain

        lcm_run = self.init_run(run.recipe)
        lcm_domain = make_domain(lcm_run)
        if _latent_space(lcm_domain, lcm_run.data_recipe) != _latent_space(domain, run.data_recipe):
            raise ValueError(f"lcf: the LCM {run.recipe.init} was trained in another data space ({lcm_run.data}: "
                             f"{_latent_space(lcm_domain, lcm_run.data_recipe)}) than this run's ({run.data}: "
                             f"{_latent_space(domain, run.data_recipe)}); LCF stays in the LCM's space"
                             + (": pass its autoencoder (--set autoencoder=PATH)" if hasattr(domain, "_ae_identity")
                                else ""))
        theirs = dict(vars(lcm_run.recipe), num_classes=lcm_domain.num_classes)
        return replace(run, recipe=replace(run.recipe, **{k: theirs[k] for k in STRUCTURE}))

    def prepare(self, recipe, teacher):
        return recipe

    def net_options(self, recipe):
        # The LCM's label slots, whatever this data's classes are (its labels index into them).
        return {**super().net_options(recipe), "num_classes": recipe.num_classes}

    def fit(self, recipe, build_model, teacher, train_once):
        from ..train import load_checkpoint

        model = build_model()
        try:
            load_checkpoint(Path(recipe.init).expanduser(), model, which="ema")
        except RuntimeError as err:  # state-dict shapes: another network size
            raise ValueError(f"lcf: the LCM {recipe.init} has another network than this run's data recipe "
                             f"(model_channels, channel_mult, ...): use the LCM's ({err})") from None
        state = train_once(model, self.loss(recipe, teacher), self.ema_decays(recipe))
        return state.emas["ema"], state

    # ---------------------------------------------------------------- consistency training
    def loss(self, recipe, teacher):
        grid, d, null = teacher_grid(recipe), recipe.distance_fn(), recipe.num_classes

        def loss_fn(f, batch, ctx):
            x0, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
            if labels is None:  # unlabelled data: the "no label" slot
                labels = torch.full((x0.shape[0],), null, dtype=torch.long, device=x0.device)
            elif int(labels.max()) >= null:
                raise ValueError(f"lcf: the data's labels reach {int(labels.max())} but the LCM has {null} classes")
            # CT = LCD whose teacher is the data point, unguided (null_label=None): the target is the EMA
            # student at x0 + sigma_n z, the same noise z one level (k grid intervals) lower.
            return lcd_loss(f, ctx.emas["target"], data_teacher(x0), x0, labels, k=recipe.k, w_min=recipe.w_min,
                            w_max=recipe.w_max, null_label=None, solver="euler", distance=d,
                            generator=ctx.generator, sigmas=grid)
        return loss_fn


def _latent_space(domain, data_recipe) -> str:
    """What identifies a domain's sample space: the autoencoder for latent domains, else the domain and shape."""
    ident = getattr(domain, "_ae_identity", None)
    if ident is not None:
        return f"autoencoder {ident(data_recipe)}"
    return f"{domain.name} {tuple(domain.shape)}"


register(LCF())
