"""Consistency distillation and consistency training (Song, Dhariwal, Chen & Sutskever 2023, "CM";
Song & Dhariwal 2023, "iCT"), as per-sample loss functions for any sample shape (B, ...).

Both train f(x, sigma) to give the same answer at two neighbouring noise levels of one
probability-flow trajectory, on the discretisation sigma_1 = sigma_min < ... < sigma_N = sigma_max
of EDM eq. 5 (the rho-schedule CM adopts, sec. 4 and appendix C). Consistency distillation (CM Algorithm 2, eq. 7) draws
x_{n+1} = x0 + sigma_{n+1} z, moves it to sigma_n with ONE step of a teacher's ODE solver and
minimises lambda(sigma_n) d(f(x_{n+1}, sigma_{n+1}), f^-(x_hat_n, sigma_n)) with a stop-gradient
target f^-. Consistency training (CM Algorithm 3, eq. 10) is the same code with the teacher
replaced by the data point itself: the exact denoiser of a point mass at x0 is D(x, sigma) = x0,
and one Euler step with it from x0 + sigma_{n+1} z lands exactly on x0 + sigma_n z (CM Theorem 2
is this estimator's justification). Schedules: N(k) and mu(k) of CM appendix C; iCT's exponential
curriculum (iCT eq. 8), lognormal level sampling (sec. 3.5), weighting
lambda = 1/(sigma_{n+1} - sigma_n) (sec. 3.1), pseudo-Huber distance (sec. 3.3) and no EMA teacher
(sec. 3.2: the target is the student under stop-gradient, mu = 0).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as nnf

from ..precond import append_dims
from ..sampling import euler_step, heun_step, randn_like

__all__ = [
    "cm_sigmas",
    "l2",
    "l1",
    "pseudo_huber",
    "lpips_distance",
    "get_distance",
    "data_teacher",
    "cd_loss",
    "ct_loss",
    "ict_loss",
    "ct_N",
    "ct_mu",
    "ict_N",
    "lognormal_index_probs",
    "WEIGHTINGS",
]

SOLVERS = {"euler": euler_step, "heun": heun_step}


def cm_sigmas(N: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM eq. 5 (as CM uses it), INCREASING: N float64 levels, sigma_1 = sigma_min, sigma_N = sigma_max."""
    if not isinstance(N, int) or isinstance(N, bool) or N < 2:
        raise ValueError(f"N must be an integer >= 2 (two levels make one consistency pair), got {N!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, N, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (lo + ramp * (hi - lo)) ** rho
    sigmas[0], sigmas[-1] = sigma_min, sigma_max  # exact endpoints, not pow(pow(.)) round trips
    return sigmas


# ---------------------------------------------------------------- distances d(x, y) -> (B,)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared l2 distance, averaged over a sample's coordinates (CM's 'l2'), shape (B,)."""
    return _flat((x - y) ** 2).mean(1)


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """l1 distance, averaged over a sample's coordinates, shape (B,)."""
    return _flat((x - y).abs()).mean(1)


def pseudo_huber(c: float | None = None) -> Callable:
    """iCT eq. 9: d(x, y) = sqrt(||x - y||^2 + c^2) - c, full (not averaged) norm; c = 0.00054 sqrt(dim) if None.

    iCT's constant is for images in [-1, 1] with dim = 3*32*32 (c ~ 0.03): it scales with
    sqrt(dim) so that it is the same fraction of a typical distance in any dimension. For the
    toy 2-D data (per-coordinate std 0.5, like images) the same rule gives c = 0.00076, i.e.
    nearly the plain l2 norm (not squared); the toy recipes choose c by measurement (recipes.py).
    """
    if c is not None and not c > 0:
        raise ValueError(f"the pseudo-Huber constant c must be > 0, got {c}")

    def distance(x, y):
        diff = _flat(x - y)
        cc = 0.00054 * math.sqrt(diff.shape[1]) if c is None else c
        return (diff.pow(2).sum(1) + cc**2).sqrt() - cc

    distance.c = c
    return distance


def lpips_distance(net: torch.nn.Module, resize: int | None = 224) -> Callable:
    """LPIPS distance (Zhang et al. 2018) of images in [-1, 1], upsampled to resize x resize as in CM sec. 5."""
    if net is None or not callable(net):
        raise ValueError(
            "the LPIPS distance needs a pretrained LPIPS network and fewstep_lab never downloads weights: "
            "build one from weights you have locally (e.g. the `lpips` package's LPIPS(net='vgg', "
            "model_path=...)) and pass get_distance('lpips', net=that_module); or use 'pseudo_huber'"
        )

    def distance(x, y):
        if x.ndim != 4:
            raise ValueError(f"LPIPS compares images (B, C, H, W), got shape {tuple(x.shape)}")
        if resize is not None and x.shape[-1] != resize:
            x = nnf.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
            y = nnf.interpolate(y, size=(resize, resize), mode="bilinear", align_corners=False)
        return net(x, y).reshape(x.shape[0])

    return distance


def get_distance(name, **kwargs) -> Callable:
    """A distance d(x, y) -> (B,) by name: 'l2', 'l1', 'pseudo_huber' (c=...), 'lpips' (net=..., resize=...)."""
    if callable(name):
        return name
    if name in ("l2", "l1"):
        if kwargs:
            raise ValueError(f"the {name} distance takes no options, got {sorted(kwargs)}")
        return l2 if name == "l2" else l1
    if name == "pseudo_huber":
        return pseudo_huber(**kwargs)
    if name == "lpips":
        return lpips_distance(kwargs.pop("net", None), **kwargs)
    raise ValueError(f"unknown distance {name!r}; choose 'l2', 'l1', 'pseudo_huber', 'lpips' or pass a callable")


# ---------------------------------------------------------------- weightings lambda(sigma_n, sigma_{n+1})

WEIGHTINGS = {
    "uniform": lambda s, s_next: torch.ones_like(s),  # CM: lambda = 1
    "ict": lambda s, s_next: 1 / (s_next - s),  # iCT sec. 3.1
}


def _weighting(weighting) -> Callable:
    if callable(weighting):
        return weighting
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {sorted(WEIGHTINGS)} or pass a callable")
    return WEIGHTINGS[weighting]


# ---------------------------------------------------------------- schedules


def ct_N(k: int, K: int, s0: int = 2, s1: int = 150) -> int:
    """CM appendix C: N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1, from s0 to s1 + 1."""
    _check_k(k, K)
    return int(math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1)


def ct_mu(k: int, K: int, s0: int = 2, s1: int = 150, mu0: float = 0.9) -> float:
    """CM appendix C: the target EMA decay mu(k) = exp(s0 ln(mu0) / N(k)), from mu0 upwards."""
    if not 0 < mu0 < 1:
        raise ValueError(f"mu0 is the target EMA decay at N = s0 and must lie in (0, 1), got {mu0!r}; "
                         "for no EMA teacher at all (mu = 0) use improved CT (ict_loss / ICTRecipe)")
    return math.exp(s0 * math.log(mu0) / ct_N(k, K, s0, s1))


def ict_N(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT eq. 8: N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1/s0) + 1))."""
    _check_k(k, K)
    K_prime = max(math.floor(K / (math.log2(math.floor(s1 / s0)) + 1)), 1)
    return min(s0 * 2 ** (k // K_prime), s1) + 1


def _check_k(k, K):
    if K < 1 or not 0 <= k <= K:
        raise ValueError(f"need 0 <= k <= K and K >= 1 (training step k of K), got k={k}, K={K}")


def lognormal_index_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT sec. 3.5: p(n) ∝ erf((ln s_{n+1} - P_mean)/(√2 P_std)) - erf((ln s_n - P_mean)/(√2 P_std)), shape (N-1,)."""
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    cdf = torch.erf((s.log() - p_mean) / (math.sqrt(2) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


# ---------------------------------------------------------------- the losses


def data_teacher(x0: torch.Tensor) -> Callable:
    """The exact denoiser of a point mass at x0: D(x, sigma) = x0. CT is CD with this teacher."""

    def D(x, sigma, cond=None):
        if x.shape != x0.shape:
            raise ValueError(f"data_teacher(x0) denoises samples shaped like x0 {tuple(x0.shape)}, "
                             f"got {tuple(x.shape)}")
        return x0

    return D


@contextlib.contextmanager
def _same_randomness(seed: int, device: torch.device):
    """Run a block with the global RNG (dropout) seeded to `seed`, restoring the outer state after."""
    on_accel = device.type != "cpu"
    with torch.random.fork_rng(devices=[device] if on_accel else [], device_type=device.type if on_accel else "cuda"):
        torch.manual_seed(seed)  # the CPU and every accelerator's default generator
        yield


def _gen_device(generator):
    return generator.device if generator is not None else torch.device("cpu")


def _draw_indices(sigmas, batch, index_sampling, p_mean, p_std, generator):
    dev = _gen_device(generator)  # draw where the generator lives, index on the CPU
    if index_sampling == "uniform":
        return torch.randint(0, len(sigmas) - 1, (batch,), generator=generator, device=dev).cpu()
    if index_sampling == "lognormal":
        probs = lognormal_index_probs(sigmas, p_mean, p_std).to(dev)
        return torch.multinomial(probs, batch, replacement=True, generator=generator).cpu()
    raise ValueError(f"unknown index_sampling {index_sampling!r}; choose 'uniform' or 'lognormal'")


def cd_loss(
    f, f_target, teacher, x0, *, N: int, solver: str = "heun", distance="l2", weighting="uniform",
    generator=None, cond=None, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
    index_sampling: str = "uniform", p_mean: float = -1.1, p_std: float = 2.0,
) -> torch.Tensor:
    """Consistency distillation, CM Algorithm 2 (eq. 7): per-sample losses (B,) for x0 of shape (B, ...).

    n ~ U{1..N-1} (or iCT's lognormal p(n)); x_{n+1} = x0 + sigma_{n+1} z; x_hat_n = one `solver`
    step of `teacher` from sigma_{n+1} to sigma_n; loss = lambda d(f(x_{n+1}), f_target(x_hat_n)).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    d, lam = get_distance(distance), _weighting(weighting)
    B, dtype, device = x0.shape[0], x0.dtype, x0.device
    sigmas = cm_sigmas(N, sigma_min, sigma_max, rho)
    n = _draw_indices(sigmas, B, index_sampling, p_mean, p_std, generator)  # on the CPU
    # sigma_n < sigma_{n+1}, shape (B,); cast before moving (some accelerators lack float64)
    sigma, sigma_next = (sigmas[m].to(dtype).to(device) for m in (n, n + 1))
    z = randn_like(x0, generator)
    x_next = x0 + append_dims(sigma_next, x0.ndim) * z
    with torch.no_grad():
        # The teacher moves x_{n+1} down one level with the samplers' own step function.
        x_hat, _ = SOLVERS[solver](teacher, x_next, sigma_next, sigma, cond)
    # Student and target must see the same dropout masks (openai/consistency_models saves and
    # restores the RNG state between the two passes): fork the global RNG and seed it identically
    # for both, from a seed drawn from the loss's own generator so the run stays reproducible.
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=_gen_device(generator)))
    with _same_randomness(seed, device):
        pred = f(x_next, sigma_next, cond)
    # Stop-gradient target: no graph through f_target, even when it is f itself (iCT, mu = 0).
    with torch.no_grad(), _same_randomness(seed, device):
        target = f_target(x_hat, sigma, cond)
    return lam(sigma, sigma_next) * d(pred, target.detach())


def ct_loss(
    f, f_target, x0, *, N: int, distance="l2", weighting="uniform", generator=None, cond=None,
    sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
    index_sampling: str = "uniform", p_mean: float = -1.1, p_std: float = 2.0,
) -> torch.Tensor:
    """Consistency training, CM Algorithm 3 (eq. 10) = cd_loss with teacher data_teacher(x0) and one Euler step."""
    return cd_loss(f, f_target, data_teacher(x0), x0, N=N, solver="euler", distance=distance,
                   weighting=weighting, generator=generator, cond=cond, sigma_min=sigma_min,
                   sigma_max=sigma_max, rho=rho, index_sampling=index_sampling, p_mean=p_mean, p_std=p_std)


def ict_loss(
    f, x0, *, k: int, K: int, generator=None, cond=None, c: float | None = None, s0: int = 10, s1: int = 1280,
    p_mean: float = -1.1, p_std: float = 2.0, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
) -> torch.Tensor:
    """Improved CT (Song & Dhariwal 2023) at training step k of K: ct_loss with iCT's five choices.

    N = ict_N(k, K), pseudo-Huber(c), lambda = 1/(sigma_{n+1} - sigma_n), lognormal levels, and the
    target is f itself under stop-gradient (no EMA teacher).
    """
    return ct_loss(f, f, x0, N=ict_N(k, K, s0, s1), distance=pseudo_huber(c), weighting="ict",
                   generator=generator, cond=cond, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                   index_sampling="lognormal", p_mean=p_mean, p_std=p_std)
