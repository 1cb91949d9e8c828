"""Recipes: one frozen dataclass per method, one instance per profile.

Change a recipe with ``dataclasses.replace(recipe, steps=...)``; nothing downstream receives an
argparse namespace. The numbers per profile were chosen by measurement on 2 CPU cores (see the
README's "Results"): ``smoke`` proves the mechanics in seconds, ``cpu`` gives the real toy-2-D
results in minutes, ``gpu`` is full scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .profiles import get_profile

__all__ = ["ToyRecipe", "toy_recipe", "recipe_to_dict", "recipe_from_dict"]


@dataclass(frozen=True)
class ToyRecipe:
    """A toy 2-D diffusion model: an MLP trained with the EDM loss ('edm') or DDPM's L_simple ('ddpm')."""

    method: str = "edm"  # 'edm' (sigma-space denoiser) or 'ddpm' (discrete eps-prediction)
    dataset: str = "8gaussians"
    hidden: int = 128
    depth: int = 4
    emb_dim: int = 32
    max_freq: float = 8.0
    steps: int = 6000
    batch_size: int = 1024
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    ddpm_schedule: str = "linear"  # for method='ddpm'
    ddpm_steps: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("edm", "ddpm"):
            raise ValueError(f"unknown toy method {self.method!r}; choose 'edm' or 'ddpm'")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("steps must be >= 0 and batch_size >= 1")


_TOY_STEPS = {"smoke": 150, "cpu": 6000, "gpu": 20000}
_TOY_BATCH = {"smoke": 256, "cpu": 1024, "gpu": 4096}


def toy_recipe(method: str = "edm", dataset: str = "8gaussians", profile: str | None = None, **overrides) -> ToyRecipe:
    """The toy recipe for `method` and `dataset` under `profile` (see fewstep_lab.profiles)."""
    p = get_profile(profile)
    base = ToyRecipe(method=method, dataset=dataset, steps=_TOY_STEPS[p], batch_size=_TOY_BATCH[p])
    return _replace(base, overrides)


def _replace(recipe, overrides):
    from dataclasses import replace

    names = {f.name for f in fields(recipe)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown recipe fields {sorted(unknown)}; valid: {sorted(names)}")
    return replace(recipe, **overrides)


def recipe_to_dict(recipe) -> dict:
    """A JSON-able dict with the recipe's class name, for checkpoint metadata."""
    return {"class": type(recipe).__name__, **asdict(recipe)}


_CLASSES = {"ToyRecipe": ToyRecipe}


def recipe_from_dict(d: dict):
    """Rebuild a recipe stored by recipe_to_dict (only known recipe classes; no code is executed)."""
    d = dict(d)
    cls = _CLASSES.get(d.pop("class", None))
    if cls is None:
        raise ValueError(f"unknown recipe class in checkpoint metadata; known: {sorted(_CLASSES)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
