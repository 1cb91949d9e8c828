"""LCM-LoRA (Luo et al. 2023, "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module") and style LoRA.

Both keep the teacher's network frozen and train only a low-rank adapter (LoRA, Hu et al. 2021;
``nets/lora.py``) of rank r in every linear and convolution layer: W + (alpha / r) B A.

``lcm-lora``: latent consistency distillation (``losses.lcm.lcd_loss``, LCM Algorithm 1: guided
teacher, w ~ U[w_min, w_max], skipping step k, EMA target) of the teacher's own denoiser plus a LoRA.
As in LCM-LoRA (and diffusers' ``train_lcm_distill_lora_sd_wds.py``) the student does NOT take w as
an input: its network is the teacher's, unchanged in shape. It is made a consistency function by
LCM's boundary scalings around the teacher's denoiser form D (EDM's Precond for ``edm-cfg``, the
epsilon-network's ``DiscreteEpsDenoiser`` for a DDPM teacher):

    f(x, sigma, c) = b_skip(sigma) x + b_out(sigma) D_{theta + BA}(x, sigma, c),

b_skip, b_out = the boundary part of ``precond.lcm_scalings`` (t = 10 (sigma - sigma_min); exactly 1
and 0 at sigma_min, so f(x, sigma_min) = x). A DDPM teacher (``ddpm-cfg``) is distilled as ``methods/lcm.py``
does it, on its own grid: N = T levels, k timesteps, LCM's boundary of the teacher's timestep t(sigma)
(``lcm_eps_scalings``), LCMScheduler's multistep grid. Which denoiser form D is, and its settings, are read from
the teacher's run when training starts and stored in the recipe (``base``, ``base_recipe``: the
teacher's method and its recipe as JSON), so ``load_run`` rebuilds the student from the checkpoint
alone. A student that cannot see w learns ONE guidance scale: with w_min = w_max it distils the
guided ODE at that w; with a range it regresses (l2) onto the average over w of the one-step targets,
a compromise whose w is not chosen at sampling time (LCM-LoRA's released adapters were trained this
way, on w in [3, 13] in diffusers' terms, and are sampled without CFG). Sampling: ``sample_lcm`` with
cond = labels only.

``lora`` (style LoRA): the teacher's own loss (``edm_loss`` / ``ddpm_loss``, label dropout as the
teacher had) on other data of the same domain, starting from the teacher's weights: the base model
may come from other data (``teacher_same_data = False``). Sampled as the teacher is.

``combine(base, [(adapter, lambda), ...])``: the teacher's denoiser plus adapters exported with
``export_adapter``; LCM-LoRA sec. 3: theta + lambda_1 tau_LCM + lambda_2 tau_style. When one of the
adapters is an acceleration vector (its file's meta carries the boundary constants) the result is
wrapped in the same ``LCMBoundary`` and sampled with ``sample_lcm`` in a few steps.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..guidance import null_label_of
from ..losses.consistency import get_distance
from ..losses.lcm import lcd_loss
from ..nets.lora import inject_lora, load_adapter, lora_layers, read_adapter_meta, save_adapter
from ..precond import append_dims, as_sigma
from ..recipes import NoiseRecipe, ema_schedule, recipe_from_fields
from . import get_method, register
from .base import Method
from .lcm import LCM, LCMRecipe, ddpm_schedule_of, teacher_grid

__all__ = ["LCMLoRARecipe", "StyleLoRARecipe", "LCMLoRA", "StyleLoRA", "LCMBoundary", "lcm_boundary",
           "export_adapter", "combine"]


def lcm_boundary(sigma: torch.Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 timestep_scaling: float = 10.0):
    """LCM's boundary scalings (b_skip, b_out) at t = timestep_scaling (sigma - sigma_min): the boundary part of
    ``precond.lcm_scalings`` (its c_skip = b_skip + b_out e_skip, c_out = b_out e_out; tests/test_lora.py)."""
    t = timestep_scaling * (sigma - sigma_min)
    return 1 / (1 + (t / sigma_data) ** 2), t / (t**2 + sigma_data**2).sqrt()


class LCMBoundary(nn.Module):
    """f(x, sigma, cond) = b_skip(sigma) x + b_out(sigma) D(x, sigma, cond): a denoiser D as a consistency function.

    EDM teacher: t = sigma - sigma_min (``lcm_boundary``). DDPM teacher (ddpm_schedule 'linear' | 'cosine' and
    num_timesteps): t = the teacher's timestep of sigma, as ``methods.lcm.lcm_eps_scalings`` (LCM's own choice,
    exactly 0 at the teacher's lowest level, so f(x, sigma_min) = x there).
    """

    def __init__(self, net: nn.Module, *, sigma_min: float, sigma_data: float = 0.5, timestep_scaling: float = 10.0,
                 ddpm_schedule: str | None = None, num_timesteps: int | None = None):
        super().__init__()
        self.net = net  # named net: null_label_of and the LoRA helpers look through it
        self.sigma_min, self.sigma_data, self.timestep_scaling = float(sigma_min), float(sigma_data), float(
            timestep_scaling)
        self.ddpm_schedule, self.num_timesteps = ddpm_schedule, num_timesteps
        self._schedule = None
        if ddpm_schedule is not None:
            from ..schedules import DiscreteSchedule, alphas_cumprod

            self._schedule = DiscreteSchedule(alphas_cumprod(ddpm_schedule, int(num_timesteps)))

    def boundary(self, sigma: torch.Tensor):
        if self._schedule is None:
            return lcm_boundary(sigma, self.sigma_data, self.sigma_min, self.timestep_scaling)
        from .lcm import lcm_eps_scalings

        c_skip, c_out, _, _ = lcm_eps_scalings(sigma, schedule=self._schedule, sigma_data=self.sigma_data,
                                               timestep_scaling=self.timestep_scaling)
        b_out = -c_out / sigma  # lcm_eps_scalings: c_skip = b_skip + b_out, c_out = -b_out sigma
        return c_skip - b_out, b_out

    def forward(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        sigma = as_sigma(sigma, x)
        b_skip, b_out = (append_dims(b, x.ndim) for b in self.boundary(sigma))
        return b_skip * x + b_out * self.net(x, sigma, cond).to(x.dtype)

    def boundary_meta(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_data": self.sigma_data, "timestep_scaling": self.timestep_scaling,
                "ddpm_schedule": self.ddpm_schedule, "num_timesteps": self.num_timesteps}


# ----------------------------------------------------------------------------- the teacher's denoiser form

def _base_recipe(recipe):
    """The teacher's method and recipe, as stored in this recipe (base, base_recipe)."""
    m = get_method(recipe.base)
    r = recipe_from_fields(m.recipe_cls, json.loads(recipe.base_recipe)) if recipe.base_recipe else m.recipe_cls()
    return m, r


def _teacher_run(teacher, method_name: str):
    run = getattr(teacher, "fewstep_run", None)
    if run is None:
        raise ValueError(f"{method_name} builds the teacher's own network plus a LoRA, so it needs the teacher's run: "
                         "pass the teacher as a checkpoint path (--teacher CKPT) or a model from pipeline.load_run / "
                         "train_run (--teacher exact has no network to adapt)")
    if not get_method(run.method).is_teacher:
        raise ValueError(f"{method_name} adapts a diffusion teacher; the model given is a {run.method}")
    return run


def _with_base(recipe, teacher, method_name):
    t_run = _teacher_run(teacher, method_name)
    return replace(recipe, base=t_run.method, base_recipe=json.dumps(_fields(t_run.recipe), sort_keys=True))


def _fields(recipe) -> dict:
    from dataclasses import asdict

    return asdict(recipe)


def _copy_base(model_base: nn.Module, teacher: nn.Module) -> None:
    """Load the teacher's weights into the (LoRA-wrapped) copy of its denoiser; only lora_* may be missing."""
    theirs, ours = teacher.state_dict(), model_base.state_dict()
    own = {k for k in ours if ".lora_A." in k or ".lora_B." in k}
    if set(theirs) != set(ours) - own or any(theirs[k].shape != ours[k].shape for k in theirs):
        raise ValueError("the teacher's network does not fit this run's network (another size or class count): "
                         "use the data recipe's network fields the teacher was trained with (e.g. --set hidden=..., "
                         "model_channels=...)")
    missing, unexpected = model_base.load_state_dict(theirs, strict=False)
    assert not unexpected and set(missing) == own


# ----------------------------------------------------------------------------- lcm-lora

@dataclass(frozen=True)
class LCMLoRARecipe(LCMRecipe):
    """LCM's fields (see LCMRecipe) plus the adapter: rank r and alpha (None: alpha = r, i.e. a factor 1).

    LCM-LoRA (diffusers' train_lcm_distill_lora_sd_wds.py): rank 64, lr 1e-4, w in [3, 13] (their
    guidance scales 4-14 minus 1), 1000-step teacher grid with 50 DDIM levels (k = 20).
    base / base_recipe: the teacher's method and recipe (JSON), filled in from the teacher.
    """

    rank: int = 64
    alpha: float | None = None
    w_min: float = 3.0
    w_max: float = 13.0
    lr: float = 1e-4
    base: str = "edm-cfg"
    base_recipe: str = ""

    def check(self) -> None:
        super().check()
        _check_adapter(self)
        if not self.init_from_teacher:
            raise ValueError("LCM-LoRA always starts from the teacher's weights (init_from_teacher=True)")
        if self.guidance != "input" or self.p_uncond:
            raise ValueError("LCM-LoRA distils the guided teacher (guidance='input', p_uncond=0); its student takes "
                             "no w")


def _check_adapter(r) -> None:
    if not isinstance(r.rank, int) or isinstance(r.rank, bool) or r.rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {r.rank!r}")
    if r.alpha is not None and not (isinstance(r.alpha, (int, float)) and not isinstance(r.alpha, bool)
                                    and 0 < r.alpha < float("inf")):
        raise ValueError(f"alpha must be a positive number or None, got {r.alpha!r}")
    if r.base_recipe:
        try:
            json.loads(r.base_recipe)
        except ValueError:
            raise ValueError("base_recipe must be the teacher's recipe as JSON (filled in from the teacher)") from None


def _null_label(teacher) -> int:
    """null_label_of, also through a DiscreteEpsDenoiser's eps_model (which guidance.null_label_of does not open)."""
    try:
        return null_label_of(teacher)
    except ValueError:
        if getattr(teacher, "eps_model", None) is None:
            raise
        return null_label_of(teacher.eps_model)


def _drop_w(f):
    """lcd_loss calls f(x, sigma, (labels, w)); an LCM-LoRA student takes the labels only."""
    return lambda x, sigma, cond: f(x, sigma, cond[0])


class _OnTeacherNet(Method):
    """What both LoRA methods share: the teacher's own network and denoiser form, plus a LoRA named "default"."""

    def net_options(self, recipe):
        m, r = _base_recipe(recipe)
        return m.net_options(r)

    def lora_denoiser(self, recipe, net):
        """The teacher method's denoiser around `net`, with a fresh (zero) LoRA of the recipe's rank injected."""
        m, r = _base_recipe(recipe)
        D = m.build(r, net)
        inject_lora(D, recipe.rank, recipe.alpha, name="default")
        return D


class LCMLoRA(_OnTeacherNet):
    name, title, recipe_cls, teacher = "lcm-lora", "LCM-LoRA", LCMLoRARecipe, "denoiser"
    needs_labels = True
    # Toy: one guidance scale (the student cannot see w), rank 8 of the 128-wide MLP (not tuned beyond a sweep
    # of lr in the report); lr 2e-3: a LoRA takes a larger step than a full fine-tune.
    _TOY = dict(N=100, k=5, w_min=2.0, w_max=2.0, multistep_sigma_min=0.25, rank=8, lr=2e-3)
    # cifar10-latent (a ddpm-cfg teacher): LCM-LoRA's grid (N = 1000, k = 20) at one w, rank 16. cpu: 0.24 s of
    # one core per step at batch 32 (timed over 10 steps), so 300 steps take about 75 s; sample quality not measured.
    _LATENT = dict(w_min=3.0, w_max=3.0, rank=16, lr=1e-3, multistep_sigma_min=0.25)
    profiles = {"toy2d": {"smoke": dict(_TOY, steps=40), "cpu": dict(_TOY, steps=1500, ema_decay=0.99),
                          "gpu": dict(_TOY, steps=6000, ema_decay=0.995)},
                "cifar10-latent": {"smoke": dict(_LATENT, steps=10), "cpu": dict(_LATENT, steps=300),
                                   "gpu": dict(_LATENT, steps=20_000, rank=64, lr=1e-4)}}

    def build(self, recipe, net):
        D = self.lora_denoiser(recipe, net)
        return LCMBoundary(D, sigma_min=recipe.sigma_min, sigma_data=recipe.sigma_data,
                           timestep_scaling=recipe.timestep_scaling, ddpm_schedule=recipe.ddpm_schedule,
                           num_timesteps=recipe.N if recipe.ddpm_schedule else None)

    def prepare(self, recipe, teacher):
        _null_label(teacher)  # a class-conditional teacher (guidance): a clear error now, not at step 1
        recipe = _with_base(recipe, teacher, self.name)
        ddpm = ddpm_schedule_of(teacher)
        if ddpm is not None:  # LCM's own path (methods/lcm.py): the teacher's T levels, k timesteps, its ends
            kind, T = ddpm
            if recipe.k >= T:
                raise ValueError(f"the skipping step k={recipe.k} must be below the teacher's {T} timesteps")
            recipe = replace(recipe, ddpm_schedule=kind, N=T, sigma_min=float(teacher.sigma_min),
                             sigma_max=float(teacher.sigma_max))
        return recipe

    def init_from_teacher(self, recipe, model, teacher):
        _copy_base(model.net, teacher)

    def loss(self, recipe, teacher):
        null, grid = _null_label(teacher), teacher_grid(recipe)
        d = get_distance("pseudo_huber", c=recipe.huber_c) if recipe.distance == "pseudo_huber" else recipe.distance

        def loss_fn(f, batch, ctx):
            x0, labels = batch
            return lcd_loss(_drop_w(f), _drop_w(ctx.emas["target"]), teacher, x0, labels, N=recipe.N, k=recipe.k,
                            w_min=recipe.w_min, w_max=recipe.w_max, null_label=null, solver=recipe.solver,
                            distance=d, generator=ctx.generator, sigmas=grid)
        return loss_fn

    def ema_decays(self, recipe):
        return {"target": recipe.target_decay, "ema": ema_schedule(recipe)}

    def sampler(self, recipe):
        return "lcm"

    def sigmas(self, recipe, steps=None):
        return LCM.sigmas(self, recipe, steps)  # LCM's grids: the rho-ramp, or LCMScheduler's timesteps (DDPM)

    def guide(self, recipe, model, labels, w=None):
        """The student takes labels only: its w was fixed in training (w_min = w_max), or averaged over a range."""
        if labels is None:
            raise ValueError("LCM-LoRA models are class-conditional: give class labels (--label C)")
        if w is not None and not recipe.w_min <= float(w) <= recipe.w_max:
            raise ValueError(f"this LCM-LoRA cannot take w at sampling: it was distilled at w in [{recipe.w_min}, "
                             f"{recipe.w_max}]; leave w unset")
        return model, labels


# ----------------------------------------------------------------------------- style lora

@dataclass(frozen=True)
class StyleLoRARecipe(NoiseRecipe):
    """A LoRA fine-tune with the teacher's own loss on other data (rank r, alpha None = r)."""

    rank: int = 8
    alpha: float | None = None
    base: str = "edm"
    base_recipe: str = ""

    def check(self) -> None:
        super().check()
        _check_adapter(self)


class StyleLoRA(_OnTeacherNet):
    name, title, recipe_cls, teacher = "lora", "style LoRA", StyleLoRARecipe, "denoiser"
    teacher_same_data = False
    _TOY = dict(rank=8, lr=2e-3, lr_schedule="cosine")
    profiles = {"toy2d": {"smoke": dict(_TOY, steps=40), "cpu": dict(_TOY, steps=1500),
                          "gpu": dict(_TOY, steps=6000)},
                # cifar10: a rank-r adapter of a c-channel layer adds about r (in + out) / (in out) ~ 2r / c, so rank 4
                # adds 7.6 % to the cpu U-Net's parameters (32-64 channels) and rank 16 adds 7.0 % to the gpu one
                # (256); LCM-LoRA: 67.5M on SD-1.5's 860M, 8 %. Sample quality not measured yet.
                "cifar10": {"smoke": dict(steps=10, rank=4), "cpu": dict(steps=300, rank=4, lr=2e-3),
                            "gpu": dict(steps=20_000, rank=16, lr=1e-4)},
                # The cifar10 numbers; cpu: about 0.1-0.2 s of one core per step at batch 32 (timed over 10 steps).
                "cifar10-latent": {"smoke": dict(steps=10, rank=4), "cpu": dict(steps=300, rank=4, lr=2e-3),
                                   "gpu": dict(steps=20_000, rank=16, lr=1e-4)}}

    def uses_labels(self, recipe):
        return get_method(recipe.base).uses_labels(_base_recipe(recipe)[1])

    def build(self, recipe, net):
        return self.lora_denoiser(recipe, net)

    def prepare(self, recipe, teacher):
        return _with_base(recipe, teacher, self.name)

    def init_from_teacher(self, recipe, model, teacher):
        _copy_base(model, teacher)

    def loss(self, recipe, teacher):
        m, r = _base_recipe(recipe)
        return m.loss(r, None)  # the teacher's own loss (and label dropout), now on the style data

    def sampler(self, recipe):
        m, r = _base_recipe(recipe)
        return m.sampler(r)

    def default_steps(self, recipe):
        m, r = _base_recipe(recipe)
        return m.default_steps(r)

    def sigmas(self, recipe, steps=None):
        m, r = _base_recipe(recipe)
        return m.sigmas(r, steps)

    def sampler_kwargs(self, recipe):
        m, r = _base_recipe(recipe)
        return m.sampler_kwargs(r)

    def guide(self, recipe, model, labels, w=None):
        m, r = _base_recipe(recipe)
        return m.guide(r, model, labels, w)  # as the teacher is guided (classifier-free guidance)


register(LCMLoRA())
register(StyleLoRA())


# ----------------------------------------------------------------------------- adapters as files, combination

def export_adapter(checkpoint, out=None, *, which: str = "ema") -> Path:
    """Write the LoRA of an lcm-lora or lora checkpoint as a small safetensors file (default: beside it,
    '<stem>.lora.safetensors'); layer names are relative to the teacher's denoiser, so adapters of one teacher
    combine. An lcm-lora adapter's meta holds the boundary constants (kind 'acceleration')."""
    from ..pipeline import load_run

    model, run = load_run(checkpoint, which=which)
    if run.method not in ("lcm-lora", "lora"):
        raise ValueError(f"{checkpoint} holds a {run.method} model, not an lcm-lora or lora run")
    out = Path(out) if out is not None else Path(checkpoint).with_suffix(".lora.safetensors")
    meta = {"method": run.method, "data": run.data, "data_recipe": _fields(run.data_recipe), "base": run.recipe.base,
            "base_recipe": run.recipe.base_recipe, "rank": run.recipe.rank}
    if run.method == "lcm-lora":
        meta.update(kind="acceleration", boundary=model.boundary_meta(), w_min=run.recipe.w_min,
                    w_max=run.recipe.w_max)
        save_adapter(out, model.net, "default", meta)
    else:
        meta.update(kind="style")
        save_adapter(out, model, "default", meta)
    return out


def combine(base, adapters, *, device="cpu") -> nn.Module:
    """The teacher's denoiser plus adapters: theta + sum_i lambda_i dtheta_i (LCM-LoRA sec. 3, eq. 4).

    base: a teacher checkpoint path or model (e.g. ``pipeline.load_run(path)[0]``; it is copied, not changed).
    adapters: [(adapter file from export_adapter, lambda), ...]; adapter i is named 'acc' (acceleration) or
    'style' (suffixed _2, _3 ... when repeated) and rescaled later with ``nets.lora.set_scale``.
    When an acceleration adapter is among them the result is ``LCMBoundary(teacher + adapters)`` with that
    adapter's boundary constants (sample it with sample_lcm, cond = labels, a few steps; lambda_acc = 0 is the
    boundary-wrapped teacher); otherwise the adapted denoiser itself (sample it as the teacher).
    """
    if isinstance(base, (str, Path)):
        from ..pipeline import load_run

        base = load_run(base)[0]
    model = copy.deepcopy(base).cpu()
    boundary, names = None, []
    base_run = getattr(base, "fewstep_run", None)
    for path, lam in adapters:
        meta = read_adapter_meta(path)
        if base_run is not None and meta.get("base") not in (None, base_run.method):
            raise ValueError(f"{path} adapts a {meta.get('base')} model; the base given is a {base_run.method}")
        kind = "acc" if meta.get("kind") == "acceleration" else "style"
        name = kind if kind not in names else f"{kind}_{sum(n.startswith(kind) for n in names) + 1}"
        load_adapter(path, model, name, scale=lam)
        names.append(name)
        if kind == "acc":
            if boundary is not None and meta["boundary"] != boundary:
                raise ValueError("two acceleration adapters with different boundary constants cannot be combined")
            boundary = meta["boundary"]
    model = LCMBoundary(model, **boundary) if boundary is not None else model
    model.adapter_names = names
    assert all(lora_layers(model, n) for n in names)
    return model.to(device).eval().requires_grad_(False)
