"""Recipes: what a training run is, as frozen dataclasses; a run = (method recipe, data recipe, profile).

A *method recipe* (one dataclass per method, defined in the method's own module under
``methods/``) holds the optimiser, EMA and loss hyperparameters. A *data recipe* (one per data
domain, under ``data/``) holds the data and the network that fits it. The *profile* (smoke |
cpu | gpu, see ``profiles.py``) picks the numbers. Where the numbers come from, in the order
applied:

1. the dataclass defaults (the papers' values);
2. the domain's training defaults for the profile (``Domain.train_defaults``: batch size,
   warm-up, EMA: what every method on that domain shares);
3. the method's table for (domain, profile) (``Method.profiles``), measured per method;
4. the caller's overrides (``dataclasses.replace``, or ``--steps``/``--set`` on the command line).

No field is defined twice: a CD hyperparameter lives in ``CDRecipe`` only, whatever the data.
Every recipe validates its fields when it is made (finite, positive, known choices), also when
it is rebuilt from a checkpoint's JSON. No paper: this is plumbing.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields, replace

__all__ = ["Recipe", "TrainRecipe", "NoiseRecipe", "Run", "apply_overrides", "recipe_from_fields",
           "ema_schedule", "parse_assignment"]


def _finite(name, value, *, positive=False, nonneg=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonneg and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


@dataclass(frozen=True)
class Recipe:
    """Base of every recipe: `check()` validates, `choices()` names fields with a closed set of values."""

    def __post_init__(self):
        self.check()

    def choices(self) -> dict:
        """{field: allowed values} for fields that take one of a few names."""
        return {}

    def check(self) -> None:
        for name, valid in self.choices().items():
            if getattr(self, name) not in valid:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {sorted(map(str, valid))}")


@dataclass(frozen=True)
class TrainRecipe(Recipe):
    """Optimisation fields every method has: length, batch, AdamW, warm-up, clipping, EMA, seed.

    The evaluation EMA is either a constant `ema_decay` or, when `ema_halflife_kimg` is set, EDM's
    rule (Karras et al. 2022, table 7): a half-life in thousands of images, at most `ema_rampup`
    times the images seen so far. `dropout` None means the domain network's own default.
    """

    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 0
    lr_schedule: str = "constant"
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    ema_halflife_kimg: float | None = None
    ema_rampup: float | None = None
    dropout: float | None = None
    seed: int = 0

    def choices(self) -> dict:
        return {"lr_schedule": ("constant", "cosine")}

    def check(self) -> None:
        super().check()
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        _finite("lr", self.lr, positive=True)
        _finite("ema_decay", self.ema_decay)
        if not 0 <= self.ema_decay <= 1:
            raise ValueError(f"ema_decay must lie in [0, 1], got {self.ema_decay}")
        for name in ("grad_clip", "ema_halflife_kimg", "ema_rampup"):
            if getattr(self, name) is not None:
                _finite(name, getattr(self, name), positive=True)
        if self.dropout is not None:
            _finite("dropout", self.dropout)
            if not 0 <= self.dropout < 1:
                raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


@dataclass(frozen=True)
class NoiseRecipe(TrainRecipe):
    """TrainRecipe plus the sigma-space noise range (EDM: sigma_data 0.5, sigma in [0.002, 80], rho 7)."""

    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def check(self) -> None:
        super().check()
        for name in ("sigma_data", "sigma_min", "sigma_max", "rho"):
            _finite(name, getattr(self, name), positive=True)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got {self.sigma_min} and {self.sigma_max}")


def ema_schedule(recipe: TrainRecipe):
    """The evaluation EMA's decay: a constant, or EDM's half-life rule as a function of the step."""
    if recipe.ema_halflife_kimg is None:
        return recipe.ema_decay
    batch, half_kimg, rampup = recipe.batch_size, recipe.ema_halflife_kimg, recipe.ema_rampup

    def decay(step: int) -> float:
        half = half_kimg * 1000
        if rampup is not None:
            half = min(half, (step + 1) * batch * rampup)
        return 0.5 ** (batch / max(half, 1e-8))

    return decay


# ----------------------------------------------------------------------------- building and JSON


def _coerce(cls, name: str, value):
    """A JSON value for field `name` of `cls`, checked against the field's annotation (lists -> tuples)."""
    hints = typing.get_type_hints(cls)
    hint = hints.get(name)
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{cls.__name__}.{name} may not be None")
    for t in options:
        origin = typing.get_origin(t) or t
        if origin is tuple and isinstance(value, (list, tuple)):
            inner = typing.get_args(t)[:1]
            if inner and not all(isinstance(v, inner[0]) and not isinstance(v, bool) for v in value):
                continue
            return tuple(value)
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool) and type(value) is origin:
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in options)
    raise ValueError(f"{cls.__name__}.{name} must be {names}, got {value!r}")


def recipe_from_fields(cls, values: dict):
    """Build `cls` from a dict (a checkpoint's JSON): unknown fields, wrong types and bad values are refused."""
    if not isinstance(values, dict):
        raise ValueError(f"a {cls.__name__} must be stored as a JSON object, got {type(values).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; valid: {sorted(names)}")
    return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})


def apply_overrides(recipe, overrides: dict):
    """dataclasses.replace with a clear error for unknown fields (values are checked by the recipe)."""
    names = {f.name for f in fields(recipe)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown {type(recipe).__name__} fields {sorted(unknown)}; valid: {sorted(names)}")
    return replace(recipe, **{k: _coerce(type(recipe), k, v) for k, v in overrides.items()})


def parse_assignment(text: str, recipes) -> tuple[int, str, object]:
    """'FIELD=VALUE' -> (index of the first recipe in `recipes` that has FIELD, field, typed value)."""
    import json

    if "=" not in text:
        raise ValueError(f"--set takes FIELD=VALUE, got {text!r}")
    name, raw = (s.strip() for s in text.split("=", 1))
    for i, recipe in enumerate(recipes):
        if name in {f.name for f in fields(recipe)}:
            try:
                value = json.loads(raw.lower() if raw.lower() in ("true", "false", "null") else raw)
            except json.JSONDecodeError:
                try:
                    value = float(raw)  # nan, inf: refused by the recipe's own checks, with its message
                except ValueError:
                    value = raw  # a bare word: a string field
            if isinstance(value, list):
                value = tuple(value)
            return i, name, _coerce(type(recipe), name, value)
    valid = sorted({f.name for r in recipes for f in fields(r)})
    raise ValueError(f"--set: no recipe field {name!r}; valid: {valid}")


def _defaults(cls) -> dict:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


@dataclass(frozen=True)
class Run:
    """One training run: a registered method and its recipe, a data domain and its recipe, the profile."""

    method: str
    recipe: TrainRecipe
    data: str
    data_recipe: Recipe
    profile: str

    def to_dict(self) -> dict:
        """JSON-able: names and plain field values only (a checkpoint stores this; no code, no pickles)."""
        return {"format": 2, "method": self.method, "recipe": asdict(self.recipe), "data": self.data,
                "data_recipe": asdict(self.data_recipe), "profile": self.profile}

    def describe(self) -> str:
        return f"{self.method} on {self.data} ({self.profile} profile)"
