"""Few-step toy 2-D models end to end: consistency distillation and training, progressive distillation.

Glue between the recipes (CDRecipe, CTRecipe, ICTRecipe, PDRecipe), the losses
(losses/consistency.py: Song et al. 2023, Algorithms 2 and 3; Song & Dhariwal 2023;
losses/progressive.py: Salimans & Ho 2022, Algorithm 2), the train loop and toy.py's batch and
evaluation functions. A consistency model is Precond(MLP, consistency_scalings) (CM appendix C);
a PD student is Precond(MLP, edm_scalings), a denoiser sampled with sample_euler on pd_sigmas(N).
Teachers are any sigma-space denoiser: a trained toy model (toy.train_toy / toy.load_toy) or the
EXACT mixture denoiser get_dataset(name).denoiser.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .losses.consistency import cd_loss, ct_loss, ct_mu, ct_N, get_distance, ict_N
from .losses.progressive import pd_loss, pd_sigmas, progressive_distillation_rounds
from .nets.mlp import MLP
from .precond import Precond, get_scalings
from .recipes import (CDRecipe, CTRecipe, ICTRecipe, PDRecipe, cd_recipe, ct_recipe, ict_recipe, pd_recipe,
                      recipe_from_dict, recipe_to_dict)
from .schedules import karras_sigmas
from .toy import EvalResult, evaluate_sampler, make_batch_fn
from .train import TrainState, load_checkpoint, read_checkpoint_meta, train

__all__ = ["build_toy_consistency", "train_toy_cd", "train_toy_ct", "train_toy_pd", "load_toy_consistency",
           "default_sampler", "default_steps", "default_sigmas", "MULTISTEP_SIGMA_MIN",
           "evaluate_toy_consistency", "train_from_cli"]

_CONSISTENCY = (CDRecipe, CTRecipe, ICTRecipe)


def build_toy_consistency(recipe) -> Precond:
    """The recipe's fresh model: Precond(MLP, consistency scalings), or Precond(MLP, EDM scalings) for PD."""
    # The initial weights are a function of recipe.seed (torch's own start seed differs per process),
    # drawn in a forked RNG so the caller's global random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        net = MLP(hidden=recipe.hidden, depth=recipe.depth, emb_dim=recipe.emb_dim, max_freq=recipe.max_freq)
    if isinstance(recipe, PDRecipe):
        return Precond(net, get_scalings("edm", sigma_data=recipe.sigma_data))
    if isinstance(recipe, _CONSISTENCY):
        return Precond(net, get_scalings("consistency", sigma_data=recipe.sigma_data, sigma_min=recipe.sigma_min))
    raise TypeError(f"expected a CDRecipe, CTRecipe, ICTRecipe or PDRecipe, got {type(recipe).__name__}")


def _init_from_teacher(model: Precond, teacher) -> None:
    """Copy an EDM teacher's network weights into the student (CM sec. 6 initialises CD this way)."""
    net = getattr(teacher, "net", None)
    theirs = net.state_dict() if isinstance(net, nn.Module) else {}
    ours = model.net.state_dict()
    if set(theirs) != set(ours) or any(theirs[k].shape != v.shape for k, v in ours.items()):
        raise ValueError("init_from_teacher=True needs a teacher Precond(MLP) with the recipe's network size "
                         "(e.g. from toy.train_toy); for the exact mixture denoiser or another network, "
                         "use dataclasses.replace(recipe, init_from_teacher=False)")
    model.net.load_state_dict(theirs)


def _distance(recipe):
    return get_distance(recipe.distance, c=recipe.huber_c) if recipe.distance == "pseudo_huber" else recipe.distance


def _train(recipe, model, loss_fn, ema_decays, *, checkpoint_path, device, progress, hooks, resume,
           checkpoint_every, meta_recipe=None) -> TrainState:
    return train(
        model, loss_fn, make_batch_fn(recipe.dataset, recipe.batch_size, device),
        steps=recipe.steps, lr=recipe.lr, warmup=recipe.warmup, grad_clip=recipe.grad_clip,
        ema_decays=ema_decays, seed=recipe.seed, device=device, checkpoint_path=checkpoint_path,
        checkpoint_every=checkpoint_every, resume=resume, meta={"recipe": recipe_to_dict(meta_recipe or recipe)},
        hooks=hooks, progress=progress,
    )


def _as_teacher(teacher, device):
    if isinstance(teacher, nn.Module):
        teacher = teacher.to(device).eval().requires_grad_(False)
    return teacher


def train_toy_cd(teacher, recipe: CDRecipe, *, checkpoint_path=None, device="cpu", progress=True, hooks=(),
                 resume=True, checkpoint_every=0) -> tuple[nn.Module, TrainState]:
    """Consistency distillation (CM Algorithm 2) of `teacher`; returns (EMA consistency model f, state)."""
    if not isinstance(recipe, CDRecipe):
        raise TypeError(f"train_toy_cd needs a CDRecipe (recipes.cd_recipe), got {type(recipe).__name__}")
    teacher = _as_teacher(teacher, device)
    model = build_toy_consistency(recipe)
    if recipe.init_from_teacher:
        _init_from_teacher(model, teacher)
    distance = _distance(recipe)

    def loss_fn(f, x0, ctx):
        return cd_loss(f, ctx.emas["target"], teacher, x0, N=recipe.N, solver=recipe.solver, distance=distance,
                       weighting=recipe.weighting, generator=ctx.generator, sigma_min=recipe.sigma_min,
                       sigma_max=recipe.sigma_max, rho=recipe.rho, index_sampling=recipe.index_sampling,
                       p_mean=recipe.p_mean, p_std=recipe.p_std)

    state = _train(recipe, model, loss_fn, {"target": recipe.target_decay, "ema": recipe.ema_decay},
                   checkpoint_path=checkpoint_path, device=device, progress=progress, hooks=hooks,
                   resume=resume, checkpoint_every=checkpoint_every)
    return state.emas["ema"].eval(), state


def train_toy_ct(recipe: CTRecipe | ICTRecipe, *, checkpoint_path=None, device="cpu", progress=True, hooks=(),
                 resume=True, checkpoint_every=0) -> tuple[nn.Module, TrainState]:
    """Consistency training from scratch: CM Algorithm 3 (CTRecipe) or improved CT (ICTRecipe); returns (EMA f, state).

    CTRecipe: N(k) = ct_N, target = EMA of the student with decay mu(k) = ct_mu (CM appendix C).
    ICTRecipe: N(k) = ict_N (exponential curriculum), target = the student itself under stop-gradient.
    """
    if not isinstance(recipe, (CTRecipe, ICTRecipe)):
        raise TypeError(f"train_toy_ct needs a CTRecipe or ICTRecipe, got {type(recipe).__name__}")
    model, distance, improved = build_toy_consistency(recipe), _distance(recipe), isinstance(recipe, ICTRecipe)
    K = max(recipe.steps, 1)
    if improved:
        ema_decays = {"ema": recipe.ema_decay}
    else:
        ema_decays = {"target": lambda k: ct_mu(k, K, recipe.s0, recipe.s1, recipe.mu0), "ema": recipe.ema_decay}

    def loss_fn(f, x0, ctx):
        N = ict_N(ctx.step, K, recipe.s0, recipe.s1) if improved else ct_N(ctx.step, K, recipe.s0, recipe.s1)
        return ct_loss(f, f if improved else ctx.emas["target"], x0, N=N, distance=distance,
                       weighting=recipe.weighting, generator=ctx.generator, sigma_min=recipe.sigma_min,
                       sigma_max=recipe.sigma_max, rho=recipe.rho, index_sampling=recipe.index_sampling,
                       p_mean=recipe.p_mean, p_std=recipe.p_std)

    state = _train(recipe, model, loss_fn, ema_decays, checkpoint_path=checkpoint_path, device=device,
                   progress=progress, hooks=hooks, resume=resume, checkpoint_every=checkpoint_every)
    return state.emas["ema"].eval(), state


def _round_path(checkpoint_path, n_steps, final):
    if checkpoint_path is None:
        return None
    p = Path(checkpoint_path)
    return p if final else p.with_name(f"{p.stem}.{n_steps}steps{p.suffix}")


def train_toy_pd(teacher, recipe: PDRecipe, *, checkpoint_path=None, device="cpu", progress=True,
                 resume=True) -> tuple[dict, dict]:
    """Progressive distillation (PD Algorithm 2), recipe.teacher_steps -> recipe.student_steps, halving per round.

    Returns (students, states), dicts keyed by the student's number of Euler steps. The final
    student is saved at checkpoint_path, round N at '<stem>.<N>steps<suffix>' beside it.
    """
    if not isinstance(recipe, PDRecipe):
        raise TypeError(f"train_toy_pd needs a PDRecipe (recipes.pd_recipe), got {type(recipe).__name__}")
    teacher = _as_teacher(teacher, device)
    states = {}

    def make_student(t):
        model = build_toy_consistency(recipe)
        # Later rounds always start from the previous student's weights; round 1 from the original
        # teacher's only with init_from_teacher (the exact mixture denoiser has no weights).
        if t is not teacher or recipe.init_from_teacher:
            _init_from_teacher(model, t)
        return model

    def train_round(student, t, sigmas):
        n = (len(sigmas) - 1) // 2

        def loss_fn(model, x0, ctx):
            return pd_loss(model, t, x0, sigmas=sigmas, generator=ctx.generator, weighting=recipe.weighting)

        state = _train(recipe, student, loss_fn, {"ema": recipe.ema_decay},
                       checkpoint_path=_round_path(checkpoint_path, n, n == recipe.student_steps), device=device,
                       progress=progress, hooks=(), resume=resume, checkpoint_every=0,
                       meta_recipe=replace(recipe, student_steps=n))
        states[n] = state
        return state.emas["ema"].eval().requires_grad_(False)

    students = progressive_distillation_rounds(
        teacher, train_round, make_student=make_student, teacher_steps=recipe.teacher_steps,
        student_steps=recipe.student_steps, sigma_min=recipe.sigma_min, sigma_max=recipe.sigma_max, rho=recipe.rho)
    return students, states


def load_toy_consistency(path, *, which: str = "ema") -> tuple[nn.Module, object]:
    """Rebuild a CD/CT/iCT/PD toy model from a checkpoint's JSON metadata and load its weights."""
    recipe = recipe_from_dict(read_checkpoint_meta(path)["recipe"])
    model = build_toy_consistency(recipe)
    load_checkpoint(path, model, which=which)
    return model.eval(), recipe


def default_sampler(recipe) -> str:
    """'consistency' for CD/CT/iCT models, 'euler' for PD students."""
    return "euler" if isinstance(recipe, PDRecipe) else "consistency"


def default_steps(recipe) -> int:
    """1 for consistency models; the student's step count for PD."""
    return recipe.student_steps if isinstance(recipe, PDRecipe) else 1


# The lowest level of the default multistep grid. sampling.search_consistency_sigmas (sliced W2
# on 10,000 points) put the 2-step level of the cpu-profile 8gaussians models at 0.24 (CD) and
# 0.25-0.33 (iCT, three seeds); at n = 50,000 the searched level and 0.25 score the same to
# within 0.0002, while 0.5 and 1.0 are 5-20% worse (see recipes.CDRecipe / ICTRecipe).
MULTISTEP_SIGMA_MIN = 0.25


def default_sigmas(recipe, steps: int | None = None) -> torch.Tensor:
    """The grid a model is sampled on: pd_sigmas(N) for PD; for consistency models [sigma_max, 0] at one
    step, else EDM's rho-ramp from sigma_max down to MULTISTEP_SIGMA_MIN, then 0 (float64)."""
    steps = default_steps(recipe) if steps is None else steps
    if isinstance(recipe, PDRecipe):
        return pd_sigmas(steps, recipe.sigma_min, recipe.sigma_max, recipe.rho)
    if steps == 1:
        return torch.tensor([recipe.sigma_max, 0.0], dtype=torch.float64)
    return karras_sigmas(steps, MULTISTEP_SIGMA_MIN, recipe.sigma_max, recipe.rho).double()


def evaluate_toy_consistency(model, recipe, steps: int | None = None, *, sigmas=None, n: int = 50_000,
                             seeds=(0, 1, 2)) -> EvalResult:
    """toy.evaluate_sampler with the model's own sampler and grid (default_sigmas)."""
    grid = default_sigmas(recipe, steps) if sigmas is None else torch.as_tensor(sigmas)
    kwargs = {"sigma_min": recipe.sigma_min} if default_sampler(recipe) == "consistency" else {}
    return evaluate_sampler(model, recipe.dataset, default_sampler(recipe), len(grid) - 1, sigmas=grid, n=n,
                            seeds=seeds, **kwargs)


_RECIPES = {"cd": cd_recipe, "ct": ct_recipe, "ict": ict_recipe, "pd": pd_recipe}


def train_from_cli(method: str, dataset: str, profile: str, *, device, checkpoint_path, teacher=None,
                   steps=None, seed=None, progress=True) -> TrainState:
    """What `fewstep train --method cd|ct|ict|pd` runs; returns the (last round's) train state."""
    if method not in _RECIPES:
        raise ValueError(f"unknown few-step method {method!r}; choose one of {sorted(_RECIPES)}")
    recipe = _RECIPES[method](dataset, profile)
    recipe = replace(recipe, **{k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None})
    if method in ("cd", "pd") and teacher is None:
        raise ValueError(f"{method} distils a teacher: pass one (a toy checkpoint or the exact mixture denoiser)")
    if method in ("cd", "pd") and not isinstance(teacher, nn.Module):
        recipe = replace(recipe, init_from_teacher=False)  # the exact denoiser has no weights to copy
    every = max(recipe.steps // 10, 1)
    if method == "cd":
        return train_toy_cd(teacher, recipe, checkpoint_path=checkpoint_path, device=device, progress=progress,
                            checkpoint_every=every)[1]
    if method == "pd":
        states = train_toy_pd(teacher, recipe, checkpoint_path=checkpoint_path, device=device, progress=progress)[1]
        return states[recipe.student_steps]
    return train_toy_ct(recipe, checkpoint_path=checkpoint_path, device=device, progress=progress,
                        checkpoint_every=every)[1]
