"""The toy 2-D domain: every dataset of ``data/toy2d.py``, an MLP, and sliced W2 against fresh data.

Data are infinite (drawn fresh each batch from a seed). The network is the residual MLP of
``nets/mlp.py``. Quality is measured as in the README's "Results" (and ../shared/MEASURE.md):
sliced W2 (256 directions) between n generated points and n fresh data points, mean ± std over
seeds, beside the data-vs-data floor; for mixtures also the mode-weight error (total variation of
the component histogram). Mixtures carry their exact denoiser, so every sampler can also be
driven by the perfect teacher.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..metrics import mean_std, mode_weight_error, noise_floor, sliced_w2
from ..nets.mlp import MLP
from ..recipes import Recipe, _finite
from ..sampling import get_sampler
from ..schedules import karras_sigmas
from .domain import Domain, register_domain
from .toy2d import DATASETS, get_dataset

__all__ = ["Toy2DRecipe", "Toy2D", "EvalResult", "ClassEvalResult", "evaluate_sampler"]


@dataclass(frozen=True)
class Toy2DRecipe(Recipe):
    """A toy dataset by name and the MLP that models it (4 x 128, frequencies capped at 8: MEASURE.md)."""

    dataset: str = "8gaussians"
    hidden: int = 128
    depth: int = 4
    emb_dim: int = 32
    max_freq: float = 8.0

    def choices(self) -> dict:
        return {"dataset": tuple(DATASETS)}

    def check(self) -> None:
        super().check()
        for name in ("hidden", "depth", "emb_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        _finite("max_freq", self.max_freq, positive=True)


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
                     progress: bool = False, reference=None, **sampler_kwargs) -> EvalResult:
    """Sliced W2 of `sampler` driven by D against fresh data, mean ± std over seeds, NFE counted.

    reference: the distribution to compare with (an object with .sample(n, generator), e.g. one
    class's mixture ``LabelledGaussianMixture.class_mixture(c)``); default: the dataset itself.
    """
    data = get_dataset(dataset_name) if reference is None else reference
    fn = get_sampler(sampler)
    grid = karras_sigmas(steps, sigma_min, sigma_max) if sigmas is None else torch.as_tensor(sigmas)
    calls = [0]

    def counted(x, sigma, cond=None):
        calls[0] += 1
        return D(x, sigma, cond)

    from tqdm.auto import tqdm

    swds, modes, secs = [], [], 0.0
    for s in tqdm(seeds, desc=f"eval {sampler}", disable=not progress, leave=False):
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
    return EvalResult(sampler, len(grid) - 1, calls[0], m, sd, mean_std(modes)[0] if modes else None,
                      secs / len(seeds) * 10_000 / n)


@dataclass
class ClassEvalResult:
    """Per-class EvalResults of one sampler; swd_mean/swd_std and mode_error are means over classes."""

    per_class: list

    def __getattr__(self, name):
        if name in ("sampler", "steps", "nfe"):
            return getattr(self.per_class[0], name)
        if name in ("swd_mean", "swd_std", "seconds_per_10k"):
            return sum(getattr(r, name) for r in self.per_class) / len(self.per_class)
        if name == "mode_error":
            errs = [r.mode_error for r in self.per_class]
            return None if None in errs else sum(errs) / len(errs)
        raise AttributeError(name)

    def row(self) -> str:
        classes = " ".join(f"{r.swd_mean:.4f}" for r in self.per_class)
        return (f"{self.sampler:>14} steps {self.steps:>4}  NFE {self.nfe:>6.0f}  per-class sliced-W2 "
                f"{self.swd_mean:.4f} ± {self.swd_std:.4f} (classes: {classes})  mode-TV {self.mode_error:.3f}")


@register_domain
class Toy2D(Domain):
    name, recipe_cls, shape, metric = "toy2d", Toy2DRecipe, (2,), "sliced-W2"
    profiles = {"smoke": {}, "cpu": {}, "gpu": {}}
    # Adam 1e-3 with 100 warm-up steps; batch by profile (MEASURE.md: batch 1024 on one core).
    train_defaults = {p: dict(batch_size=b, lr=1e-3, warmup=100, grad_clip=1.0, ema_decay=0.999)
                      for p, b in (("smoke", 256), ("cpu", 1024), ("gpu", 4096))}

    def __init__(self, recipe, *, root=None):
        super().__init__(recipe, root=root)
        self.data = get_dataset(recipe.dataset)

    @property
    def exact_denoiser(self):
        return getattr(self.data, "denoiser", None)

    @property
    def num_classes(self):
        """Labelled mixtures (data/labelled.py): their class count; other sets: None."""
        return getattr(self.data, "num_classes", None)

    def batch_fn(self, batch_size: int, device="cpu", *, labels: bool = False):
        """fn(generator) -> a fresh batch (toy data are infinite); with labels, (x0, labels): the CLASS labels
        of a labelled mixture, else the mixture component."""
        if labels and not hasattr(self.data, "assign"):
            raise ValueError(f"{self.recipe.dataset!r} has no components to use as labels")
        if labels and self.num_classes is not None:
            return lambda g: tuple(t.to(device) for t in self.data.sample_with_classes(batch_size, g))
        if labels:
            return lambda g: tuple(t.to(device) for t in self.data.sample(batch_size, g, return_labels=True))
        return lambda g: self.data.sample(batch_size, g).to(device)

    def make_net(self, *, noise_scale: float = 1.0, dropout: float | None = None, num_classes: int | None = None,
                 guidance_embed: bool = False):
        """The MLP; num_classes: class-conditional (label num_classes = no label); guidance_embed: takes w too."""
        if dropout:
            raise ValueError("the toy MLP has no dropout; leave dropout unset for toy2d")
        r = self.recipe
        return MLP(hidden=r.hidden, depth=r.depth, emb_dim=r.emb_dim, max_freq=r.max_freq, noise_scale=noise_scale,
                   num_classes=num_classes, guidance_embed=guidance_embed)

    def evaluate(self, D, sampler: str, sigmas, *, n: int = 50_000, seeds=(0, 1, 2), progress: bool = False,
                 **sampler_kwargs) -> EvalResult:
        return evaluate_sampler(D, self.recipe.dataset, sampler, len(sigmas) - 1, sigmas=sigmas, n=n, seeds=seeds,
                                progress=progress, **sampler_kwargs)

    def evaluate_classes(self, condition, sampler: str, sigmas, *, n: int = 50_000, seeds=(0, 1, 2),
                         progress: bool = False, **sampler_kwargs) -> "ClassEvalResult":
        """Per-class sliced W2 of a class-conditional sampler (labelled mixtures, data/labelled.py).

        For each class c, condition(labels) -> (D, cond) gives the (guided) denoiser and its condition
        for n samples of class c; they are scored against fresh draws of p(x0 | c) (the class's own
        distribution, whatever the guidance). The result's mean is over classes.
        """
        if self.num_classes is None:
            raise ValueError(f"{self.recipe.dataset!r} has no class labels; per-class evaluation needs labelled "
                             "data such as 8gaussians-4class")
        rows = []
        for c in range(self.num_classes):
            D, cond = condition(torch.full((n,), c, dtype=torch.long))
            rows.append(evaluate_sampler(D, self.recipe.dataset, sampler, len(sigmas) - 1, sigmas=sigmas, n=n,
                                         seeds=seeds, progress=progress, reference=self.data.class_mixture(c),
                                         cond=cond, **sampler_kwargs))
        return ClassEvalResult(rows)

    def floor(self, n: int, seeds=(0, 1, 2)) -> tuple[float, float]:
        """Sliced W2 between two fresh data samples: (mean, std) over seeds."""
        return mean_std(noise_floor(self.data.sample, n, seeds=tuple(seeds)))

    def class_floor(self, n: int, seeds=(0, 1, 2)) -> tuple[float, float]:
        """The per-class floor: sliced W2 between two fresh samples of each class, averaged over classes."""
        per = [mean_std(noise_floor(self.data.class_mixture(c).sample, n, seeds=tuple(seeds)))
               for c in range(self.num_classes)]
        return sum(m for m, _ in per) / len(per), sum(s for _, s in per) / len(per)

    def same_data(self, other) -> bool:
        return isinstance(other, Toy2DRecipe) and other.dataset == self.recipe.dataset
