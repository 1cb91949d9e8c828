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
    lr_schedule: str = "cosine"  # decay to 0: the last steps average out the gradient noise
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


# ---------------------------------------------------------------- consistency models and PD
# Song et al. 2023 ("CM"), Song & Dhariwal 2023 ("iCT"), Salimans & Ho 2022 ("PD") on toy 2-D
# data; trained by fewstep_lab.toy_consistency. Network fields match ToyRecipe's, so a student
# can start from an EDM teacher's weights.


@dataclass(frozen=True)
class _ToyStudent:
    """Fields shared by the few-step toy recipes: data, network, noise range, optimiser."""

    dataset: str = "8gaussians"
    hidden: int = 128
    depth: int = 4
    emb_dim: int = 32
    max_freq: float = 8.0
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    steps: int = 4000
    batch_size: int = 1024
    lr: float = 1e-3
    warmup: int = 100
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    seed: int = 0

    def _check(self, **choices):
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("steps must be >= 0 and batch_size >= 1")
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {sorted(valid)}")
        if getattr(self, "huber_c", None) is not None and getattr(self, "distance", None) != "pseudo_huber":
            raise ValueError("huber_c is the pseudo-Huber constant: set distance='pseudo_huber' or huber_c=None")


_DISTANCES = ("l2", "l1", "pseudo_huber")


@dataclass(frozen=True)
class CDRecipe(_ToyStudent):
    """Consistency distillation (CM Algorithm 2) of a toy teacher, student started from the teacher's weights.

    Defaults are CM's CIFAR-10 CD choices (N = 18, Heun, target EMA mu = 0.95) with l2 in place
    of LPIPS. cpu profile, measured on 8gaussians (2 CPU cores, one thread):
        fewstep train --method edm --profile cpu --out teacher.pt        # Heun-35 sliced W2 0.0176 ± 0.0031
        fewstep train --method cd --teacher teacher.pt --profile cpu --out cd.pt
        fewstep eval --ckpt cd.pt [--steps 2]                            # n = 50,000, seeds 0-2
    gives CD 1 step 0.0195 ± 0.0018 (1.1x the teacher's Heun-35 0.0176 ± 0.0031; the data-vs-data
    floor is 0.0136 ± 0.0009) and 2 steps [80, 0.25, 0] 0.0158 ± 0.0019, in 1,500 steps (60 s of
    training). Starting from random weights (EMA 0.999) instead gave 1-step 0.026 after 3,000
    steps (n = 20,000; an earlier teacher). The exact mixture denoiser as teacher needs
    init_from_teacher=False (it has no weights to copy).
    """

    N: int = 18
    solver: str = "heun"
    distance: str = "l2"
    huber_c: float | None = None
    weighting: str = "uniform"
    index_sampling: str = "uniform"
    p_mean: float = -1.1
    p_std: float = 2.0
    target_decay: float = 0.95
    init_from_teacher: bool = True

    def __post_init__(self):
        self._check(solver=("euler", "heun"), distance=_DISTANCES, weighting=("uniform", "ict"),
                    index_sampling=("uniform", "lognormal"))


@dataclass(frozen=True)
class CTRecipe(_ToyStudent):
    """Consistency training (CM Algorithm 3; N(k), mu(k) of appendix C) from scratch.

    The defaults are CM's CIFAR-10 constants (s0 = 2, s1 = 150, mu0 = 0.9, l2 for LPIPS). The toy
    profiles keep them but for mu0 = 0.01 (_TOY_CT_MU0), measured with `python
    scripts/sweep_ct_mu0.py --dataset D` (cpu profile: 3,000 steps, EMA 0.995; sliced W2 at
    n = 20,000, 3 evaluation seeds, one training seed; ~80-100 s of training each, one thread):

        mu0    mu(K)   8gaussians 1 / 2 steps   checkerboard 1 / 2 steps
        0.9    0.9986  0.4398 / 0.2785          0.4610 / 0.3073
        0.5    0.9909  0.1439 / 0.0708          0.1065 / 0.0785
        0.1    0.9700  0.0761 / 0.0538          0.0578 / 0.0420
        0.01   0.9408  0.0622 / 0.0531          0.0439 / 0.0404
        0.001  0.9126  0.0628 / 0.0553          0.0409 / 0.0387
        floor          0.0156                   0.0082

    With CM's mu0 the model collapses to one blob (a point at the data mean scores ~0.43) and
    stays there. A likely reason: the target network, an EMA that averages over ~700 steps by
    the end, passes the boundary condition up a grid of ~150 levels too slowly for a run of a
    few thousand steps. A shorter target memory lets it learn; iCT drops the EMA teacher
    altogether (mu = 0, ICTRecipe).
    Earlier single runs with CM's mu0: s0 = 10, s1 = 320 failed the same way; iCT's loss with
    the EMA teacher mu(k) reached 0.194 (1 step).
    """

    s0: int = 2
    s1: int = 150
    mu0: float = 0.9
    distance: str = "l2"
    huber_c: float | None = None
    weighting: str = "uniform"
    index_sampling: str = "uniform"
    p_mean: float = -1.1
    p_std: float = 2.0

    def __post_init__(self):
        self._check(distance=_DISTANCES, weighting=("uniform", "ict"), index_sampling=("uniform", "lognormal"))


@dataclass(frozen=True)
class ICTRecipe(_ToyStudent):
    """Improved consistency training (Song & Dhariwal 2023) from scratch: no EMA teacher (target = stop-grad student).

    Defaults are iCT's (s0 = 10, s1 = 1280, pseudo-Huber with c = 0.00054 sqrt(d), P_mean = -1.1,
    P_std = 2.0). The cpu profile uses s1 = 160 (5 curriculum stages in 3,000 steps) and a
    sampling EMA of 0.995, chosen on 8gaussians from single runs of 3,000-6,000 steps (n = 20,000):
    s1 = 1280 / 320 / 160 / 80 all end near 0.03-0.04 at 1 step, the raw model fluctuating late
    in training (the loop has no lr decay), so 6,000 steps did not help (0.047); c = 0.03 instead
    of 0.00076 was no better; EMA 0.999 lags; lr 3e-4 or 5e-4 is slower. Measured with
    `fewstep train --method ict --profile cpu --seed S --out ict.pt && fewstep eval --ckpt ict.pt`
    (n = 50,000, eval seeds 0-2), training seeds S = 0, 1, 2: 1 step 0.0409, 0.0315, 0.0397 (mean
    0.037, 2.7x the floor 0.0136 ± 0.0009); 2 steps at [80, 0.25, 0]: 0.0227, 0.0166, 0.0142
    (mean 0.018, 1.3x the floor); re-measured with the same figures on the idle machine, 87-94 s
    of training a run (one thread).
    """

    s0: int = 10
    s1: int = 1280
    distance: str = "pseudo_huber"
    huber_c: float | None = None
    weighting: str = "ict"
    index_sampling: str = "lognormal"
    p_mean: float = -1.1
    p_std: float = 2.0

    def __post_init__(self):
        self._check(distance=_DISTANCES, weighting=("uniform", "ict"), index_sampling=("uniform", "lognormal"))


@dataclass(frozen=True)
class PDRecipe(_ToyStudent):
    """Progressive distillation (PD Algorithm 2), halving teacher_steps down to student_steps.

    `steps` is the number of optimiser steps of EACH round; every student starts from its
    teacher's weights (round 1 from the original teacher only if init_from_teacher). cpu profile
    (64 -> 1 in 6 rounds of 600 steps, EMA 0.99) on 8gaussians from the cpu EDM teacher of
    CDRecipe's docstring (64 Euler steps: 0.0143 ± 0.0033), `fewstep train --method pd --teacher
    teacher.pt --profile cpu --out pd.pt && fewstep eval --ckpt pd.pt`: 1 Euler step 0.0168 ±
    0.0018 (n = 50,000, seeds 0-2; floor 0.0136 ± 0.0009); the 2-step student (pd.2steps.pt)
    0.0166 ± 0.0019. About 20 s of training per round, one thread.
    """

    teacher_steps: int = 64
    student_steps: int = 1
    weighting: str = "truncated_snr"
    init_from_teacher: bool = True

    def __post_init__(self):
        self._check(weighting=("truncated_snr", "uniform"))
        ratio = self.teacher_steps // max(self.student_steps, 1)
        exact = ratio * self.student_steps == self.teacher_steps
        if self.student_steps < 1 or ratio < 2 or not exact or ratio & (ratio - 1):
            raise ValueError(f"teacher_steps / student_steps must be a power of two >= 2, got "
                             f"{self.teacher_steps} / {self.student_steps}")


# CT's target decay mu0 on toy data (CTRecipe's default 0.9 is CM's CIFAR-10 value): measured with
# scripts/sweep_ct_mu0.py, see CTRecipe.
_TOY_CT_MU0 = 0.01

_STUDENT_PROFILES = {
    # profile: {recipe class: overrides}; cpu measured (see each class docstring); gpu NOT yet measured
    "smoke": {CDRecipe: dict(steps=60, batch_size=256), CTRecipe: dict(steps=60, batch_size=256, mu0=_TOY_CT_MU0),
              ICTRecipe: dict(steps=60, batch_size=256), PDRecipe: dict(steps=20, batch_size=256, teacher_steps=4)},
    "cpu": {CDRecipe: dict(steps=1500, ema_decay=0.99), CTRecipe: dict(steps=3000, ema_decay=0.995, mu0=_TOY_CT_MU0),
            ICTRecipe: dict(steps=3000, ema_decay=0.995, s1=160), PDRecipe: dict(steps=600, ema_decay=0.99)},
    "gpu": {CDRecipe: dict(steps=6000, batch_size=4096, ema_decay=0.995),
            CTRecipe: dict(steps=12000, batch_size=4096, ema_decay=0.999, mu0=_TOY_CT_MU0),
            ICTRecipe: dict(steps=6000, batch_size=4096, ema_decay=0.995, s1=160),
            PDRecipe: dict(steps=2000, batch_size=4096, ema_decay=0.995)},
}


def _student_recipe(cls, dataset, profile, overrides):
    base = cls(dataset=dataset, **_STUDENT_PROFILES[get_profile(profile)][cls])
    return _replace(base, overrides)


def cd_recipe(dataset: str = "8gaussians", profile: str | None = None, **overrides) -> CDRecipe:
    """The consistency-distillation recipe for `dataset` under `profile`."""
    return _student_recipe(CDRecipe, dataset, profile, overrides)


def ct_recipe(dataset: str = "8gaussians", profile: str | None = None, **overrides) -> CTRecipe:
    """The consistency-training recipe (CM's schedules; mu0 set for toy data, see CTRecipe) for `dataset` under `profile`."""
    return _student_recipe(CTRecipe, dataset, profile, overrides)


def ict_recipe(dataset: str = "8gaussians", profile: str | None = None, **overrides) -> ICTRecipe:
    """The improved consistency-training recipe for `dataset` under `profile`."""
    return _student_recipe(ICTRecipe, dataset, profile, overrides)


def pd_recipe(dataset: str = "8gaussians", profile: str | None = None, **overrides) -> PDRecipe:
    """The progressive-distillation recipe for `dataset` under `profile`."""
    return _student_recipe(PDRecipe, dataset, profile, overrides)


_CLASSES.update({c.__name__: c for c in (CDRecipe, CTRecipe, ICTRecipe, PDRecipe)})
__all__ += ["CDRecipe", "CTRecipe", "ICTRecipe", "PDRecipe", "cd_recipe", "ct_recipe", "ict_recipe", "pd_recipe"]
