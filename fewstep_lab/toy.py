"""Toy 2-D models end to end: build the denoiser a recipe describes, train it, load it, score it.

This is glue between recipes, nets, losses, the train loop and the metrics, shared by the
notebooks, the ``fewstep`` command and the benchmark, so none of them repeats it. The
evaluation protocol is the one in the README's "Results": sliced W2 (256 directions) at large
n against fresh data, mean and std over seeds, beside the data-vs-data floor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .data.toy2d import get_dataset
from .losses.denoising import ddpm_loss, edm_loss
from .metrics import mean_std, mode_weight_error, sliced_w2
from .nets.mlp import MLP
from .precond import DiscreteEpsDenoiser, Precond, get_scalings
from .recipes import ToyRecipe, recipe_from_dict, recipe_to_dict
from .sampling import get_sampler
from .schedules import alphas_cumprod, karras_sigmas
from .train import TrainState, load_checkpoint, read_checkpoint_meta, train

__all__ = ["build_toy_model", "train_toy", "load_toy", "evaluate_sampler", "EvalResult", "make_batch_fn"]


def build_toy_model(recipe: ToyRecipe) -> nn.Module:
    """The trainable module of a recipe: Precond(MLP, edm) or DiscreteEpsDenoiser(MLP eps-model).

    The initial weights depend only on recipe.seed (the global RNG is forked and seeded), so a
    run is reproducible from its recipe alone.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return _build(recipe)


def _build(recipe: ToyRecipe) -> nn.Module:
    if recipe.method == "edm":
        net = MLP(hidden=recipe.hidden, depth=recipe.depth, emb_dim=recipe.emb_dim, max_freq=recipe.max_freq)
        return Precond(net, get_scalings("edm", sigma_data=recipe.sigma_data))
    # DDPM: the network sees the integer timestep t in [0, T); scale it to about [0, 4].
    net = MLP(hidden=recipe.hidden, depth=recipe.depth, emb_dim=recipe.emb_dim, max_freq=recipe.max_freq,
              noise_scale=4.0 / recipe.ddpm_steps)
    return DiscreteEpsDenoiser(net, alphas_cumprod(recipe.ddpm_schedule, recipe.ddpm_steps))


def make_batch_fn(dataset_name: str, batch_size: int, device="cpu"):
    """batch_fn(generator) drawing a fresh batch of toy data (toy data is infinite)."""
    data = get_dataset(dataset_name)
    return lambda g: data.sample(batch_size, g).to(device)


def _loss_fn(recipe: ToyRecipe):
    if recipe.method == "edm":
        return lambda model, x0, ctx: edm_loss(model, x0, generator=ctx.generator, p_mean=recipe.p_mean,
                                               p_std=recipe.p_std, sigma_data=recipe.sigma_data)
    return lambda model, x0, ctx: ddpm_loss(model.eps_model, x0, model.schedule.alphas_cumprod,
                                            generator=ctx.generator)


def train_toy(recipe: ToyRecipe, *, checkpoint_path=None, device="cpu", progress=True, hooks=(),
              resume=True, checkpoint_every=0) -> tuple[nn.Module, TrainState]:
    """Train the recipe's model; returns (EMA denoiser in eval mode, train state)."""
    model = build_toy_model(recipe)
    state = train(
        model, _loss_fn(recipe), make_batch_fn(recipe.dataset, recipe.batch_size, device),
        steps=recipe.steps, lr=recipe.lr, warmup=recipe.warmup, lr_schedule=recipe.lr_schedule,
        grad_clip=recipe.grad_clip,
        ema_decays={"ema": recipe.ema_decay}, seed=recipe.seed, device=device,
        checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, resume=resume,
        meta={"recipe": recipe_to_dict(recipe)}, hooks=hooks, progress=progress,
    )
    return state.emas["ema"].eval(), state


def load_toy(path, *, which: str = "ema") -> tuple[nn.Module, ToyRecipe]:
    """Rebuild a toy model from a checkpoint's JSON metadata and load its weights (no pickled code)."""
    recipe = recipe_from_dict(read_checkpoint_meta(path)["recipe"])
    model = build_toy_model(recipe)
    load_checkpoint(path, model, which=which)
    return model.eval(), recipe


@dataclass
class EvalResult:
    sampler: str
    steps: int
    nfe: float
    swd_mean: float
    swd_std: float
    mode_error: float | None
    seconds_per_10k: float

    def row(self) -> str:
        mode = "" if self.mode_error is None else f"  mode-TV {self.mode_error:.3f}"
        return (f"{self.sampler:>14} steps {self.steps:>4}  NFE {self.nfe:>6.0f}  sliced-W2 "
                f"{self.swd_mean:.4f} ± {self.swd_std:.4f}{mode}  {self.seconds_per_10k:.2f} s/10k")


def evaluate_sampler(D, dataset_name: str, sampler: str = "heun", steps: int = 18, *, n: int = 50_000,
                     seeds=(0, 1, 2), sigmas=None, sigma_min: float = 0.002, sigma_max: float = 80.0,
                     **sampler_kwargs) -> EvalResult:
    """Sliced W2 of `sampler` driven by D against fresh data, mean ± std over seeds, NFE counted."""
    data = get_dataset(dataset_name)
    fn = get_sampler(sampler)
    grid = karras_sigmas(steps, sigma_min, sigma_max) if sigmas is None else torch.as_tensor(sigmas)
    calls = [0]

    def counted(x, sigma, cond=None):
        calls[0] += 1
        return D(x, sigma, cond)

    swds, modes, secs = [], [], 0.0
    for s in seeds:
        g = torch.Generator().manual_seed(1000 + s)
        x = grid[0] * torch.randn(n, 2, generator=g)
        calls[0] = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            out = fn(counted, x, grid, generator=g, **sampler_kwargs)
        secs += time.perf_counter() - t0
        out = out[0] if isinstance(out, tuple) else out
        ref = data.sample(n, torch.Generator().manual_seed(5000 + s))
        swds.append(sliced_w2(out, ref))
        if hasattr(data, "denoiser"):
            modes.append(mode_weight_error(data, out))
    m, sd = mean_std(swds)
    return EvalResult(sampler, steps, calls[0], m, sd, mean_std(modes)[0] if modes else None,
                      secs / len(seeds) * 10_000 / n)
