"""Samplers in sigma-space: one free function per algorithm, shared by every method.

The probability-flow ODE in sigma-space is dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al.
2022, "EDM", eq. 3 with sigma(t) = t, s(t) = 1). Its Euler discretisation is DDIM (Song, Meng &
Ermon 2021, eq. 13; EDM sec. 3), its Heun discretisation is EDM Algorithm 1, the log-sigma
midpoint rule is DPM-Solver-2 (Lu et al. 2022, Algorithm 1 with r1 = 1/2) and DPM-Solver++(2M)
is Lu et al. 2023, Algorithm 2. Ancestral sampling takes DDPM's posterior step q(x_s | x_t, x0)
(Ho et al. 2020, eq. 7) with x0 replaced by D; Euler–Maruyama discretises the reverse-time SDE
(Song et al. 2021, eq. 6) of the VE process dx = sqrt(d sigma^2 / dt) dw. Consistency models are
sampled with Song et al. 2023, Algorithm 1, latent consistency models with LCM's multistep sampler
(Luo et al. 2023, Algorithm 3: re-noise with the full forward process). Losses that need an ODE step (consistency
distillation, LCM) call `euler_step`/`heun_step` from here; they never re-implement a solver.

Every sampler has the signature ``sample_<name>(D, x, sigmas, *, cond=None, generator=None,
callback=None)``, where x starts as sigmas[0] * N(0, I) and sigmas is a decreasing grid ending
in 0; `callback` receives a dict with i, x, sigma, sigma_next and denoised after each step.
The deterministic samplers (Euler, Heun, DPM-Solver) accept `generator` and draw nothing from
it, so that every sampler can be called the same way (the issue's shared signature).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .precond import append_dims, as_sigma
from .schedules import check_sigmas

__all__ = [
    "to_d",
    "euler_step",
    "heun_step",
    "sample_euler",
    "sample_heun",
    "sample_ancestral",
    "sample_dpm_solver_2",
    "sample_dpmpp_2m",
    "sample_euler_maruyama",
    "sample_ode_adaptive",
    "sample_consistency",
    "sample_lcm",
    "SAMPLERS",
    "get_sampler",
    "randn_like",
]


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like x; drawn from `generator` (on its own device) when given."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def _denoise(D, x, sigma, cond):
    out = D(x, as_sigma(sigma, x), cond)
    if out.shape != x.shape:
        raise ValueError(
            f"the denoiser returned shape {tuple(out.shape)} for input shape {tuple(x.shape)}; "
            "D(x, sigma, cond) must return an x0 estimate shaped like x"
        )
    return out


def _prepare(x, sigmas):
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] < 1:
        raise ValueError("x must be a tensor of shape (batch, ...) with batch >= 1")
    # One cheap pass before any network call: NaN/inf in the start noise would only surface as NaN samples.
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"x holds {bad} NaN or inf value(s); samplers start from finite noise, "
                         "e.g. x = sigmas[0] * torch.randn(shape)")
    return check_sigmas(torch.as_tensor(sigmas)).to(x.device, torch.float64)


def to_d(x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
    """PF-ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 3)."""
    return (x - denoised) / append_dims(as_sigma(sigma, x), x.ndim)


def euler_step(D, x, sigma, sigma_next, cond=None, denoised=None):
    """One Euler (= DDIM, eta = 0) step of the PF-ODE from sigma to sigma_next; returns (x_next, D(x, sigma))."""
    if denoised is None:
        denoised = _denoise(D, x, sigma, cond)
    dt = append_dims(as_sigma(sigma_next, x) - as_sigma(sigma, x), x.ndim)
    return x + to_d(x, sigma, denoised) * dt, denoised


def heun_step(D, x, sigma, sigma_next, cond=None, denoised=None):
    """One Heun step (EDM Algorithm 1, lines 5-8): Euler, then the trapezoidal correction unless sigma_next = 0."""
    x_euler, denoised = euler_step(D, x, sigma, sigma_next, cond, denoised)
    sn = as_sigma(sigma_next, x)
    if bool((sn == 0).all()):
        return x_euler, denoised
    if bool((sn == 0).any()):
        raise ValueError("heun_step needs sigma_next either all zero or all positive across the batch")
    d = to_d(x, sigma, denoised)
    d_next = to_d(x_euler, sn, _denoise(D, x_euler, sn, cond))
    dt = append_dims(sn - as_sigma(sigma, x), x.ndim)
    return x + (d + d_next) / 2 * dt, denoised


def _loop(step, x, sigmas, callback):
    sigmas = _prepare(x, sigmas)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        x, denoised = step(x, s, s_next)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised})
    return x


@torch.no_grad()
def sample_euler(D, x, sigmas, *, cond=None, generator=None, callback=None):
    """Euler on the PF-ODE = deterministic DDIM (Song et al. 2021, eq. 13, eta = 0); one NFE a step."""
    return _loop(lambda x, s, sn: euler_step(D, x, s, sn, cond), x, sigmas, callback)


@torch.no_grad()
def sample_heun(D, x, sigmas, *, cond=None, generator=None, callback=None):
    """EDM Algorithm 1 (Heun's 2nd order method, deterministic); 2 NFE a step, 1 for the last."""
    return _loop(lambda x, s, sn: heun_step(D, x, s, sn, cond), x, sigmas, callback)


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part to sigma_down and fresh noise sigma_up (DDIM eq. 16 in sigma-space)."""
    if sigma_next == 0:
        return 0.0, 0.0
    # Posterior std of x_s given x_t and x0 for x_t = x_s + sqrt(sigma^2 - sigma_next^2) n.
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    return sigma_down, sigma_up


@torch.no_grad()
def sample_ancestral(D, x, sigmas, *, cond=None, generator=None, callback=None, eta: float = 1.0):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2 / eq. 7), generalised by DDIM's eta (eta = 0 is Euler)."""
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")

    def step(x, s, sn):
        sigma_down, sigma_up = ancestral_sigmas(s, sn, eta)
        x, denoised = euler_step(D, x, s, sigma_down, cond)
        if sigma_up > 0:
            x = x + randn_like(x, generator) * sigma_up
        return x, denoised

    return _loop(step, x, sigmas, callback)


@torch.no_grad()
def sample_dpm_solver_2(D, x, sigmas, *, cond=None, generator=None, callback=None):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1, r1 = 1/2): midpoint in log sigma; 2 NFE a step, Euler to 0."""

    def step(x, s, sn):
        if sn == 0:
            return euler_step(D, x, s, sn, cond)
        s_mid = math.sqrt(s * sn)  # the midpoint in lambda = -log sigma
        x_mid, denoised = euler_step(D, x, s, s_mid, cond)
        d_mid = to_d(x_mid, s_mid, _denoise(D, x_mid, s_mid, cond))
        return x + d_mid * (sn - s), denoised

    return _loop(step, x, sigmas, callback)


@torch.no_grad()
def sample_dpmpp_2m(D, x, sigmas, *, cond=None, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2023, Algorithm 2) in sigma-space; one NFE a step."""
    state = {"old": None, "h_last": None}

    def step(x, s, sn):
        denoised = _denoise(D, x, s, cond)
        if sn == 0:
            return denoised, denoised
        h = math.log(s / sn)
        if state["old"] is None:
            d_eff = denoised
        else:
            r = state["h_last"] / h
            d_eff = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * state["old"]
        state["old"], state["h_last"] = denoised, h
        return (sn / s) * x + (1 - sn / s) * d_eff, denoised

    return _loop(step, x, sigmas, callback)


@torch.no_grad()
def sample_euler_maruyama(D, x, sigmas, *, cond=None, generator=None, callback=None):
    """Euler–Maruyama on the reverse VE SDE (Song et al. 2021, eq. 6; their 'reverse diffusion' predictor).

    x <- x + (sigma^2 - sigma_next^2) * score + sqrt(sigma^2 - sigma_next^2) * z, with
    score = (D - x) / sigma^2. The last step to sigma = 0 returns D(x) without noise.
    """

    def step(x, s, sn):
        denoised = _denoise(D, x, s, cond)
        if sn == 0:
            return denoised, denoised
        var = s**2 - sn**2
        x = x + var * (denoised - x) / s**2 + math.sqrt(var) * randn_like(x, generator)
        return x, denoised

    return _loop(step, x, sigmas, callback)


@torch.no_grad()
def sample_ode_adaptive(
    D, x, sigmas, *, cond=None, generator=None, callback=None,
    method: str = "dopri5", rtol: float = 1e-4, atol: float = 1e-4,
):
    """PF-ODE solved by torchdiffeq (dopri5 by default) in log sigma; returns (x, nfe).

    dx/d(ln sigma) = x - D(x, sigma). The solution is reported at each positive sigma of the
    grid (callback), then the last step to 0 is Euler, i.e. x = D(x, sigma_min): one more NFE.
    """
    from torchdiffeq import odeint

    sigmas = _prepare(x, sigmas)
    nfe = 0

    def drift(log_sigma, x_):
        nonlocal nfe
        nfe += 1
        return x_ - _denoise(D, x_, log_sigma.exp().item(), cond)

    positive = sigmas[:-1]
    if len(positive) > 1:
        xs = odeint(drift, x, positive.log().to(x.dtype), method=method, rtol=rtol, atol=atol)
    else:
        xs = x.unsqueeze(0)
    for i in range(len(positive) - 1):
        if callback is not None:
            callback({"i": i, "x": xs[i + 1], "sigma": positive[i].item(),
                      "sigma_next": positive[i + 1].item(), "denoised": None})
    x = xs[-1]
    x, denoised = euler_step(D, x, positive[-1].item(), 0.0, cond)
    nfe += 1
    if callback is not None:
        callback({"i": len(positive) - 1, "x": x, "sigma": positive[-1].item(), "sigma_next": 0.0,
                  "denoised": denoised})
    return x, nfe


@torch.no_grad()
def sample_consistency(
    f, x, sigmas, *, cond=None, generator=None, callback=None,
    sigma_min: float = 0.002, project: Callable | None = None,
):
    """Song et al. 2023, Algorithm 1: one step when sigmas holds one positive level, else multistep.

    x starts as sigmas[0] * z. Each later level tau re-noises the current estimate to
    x + sqrt(tau^2 - sigma_min^2) z and applies f again. `project` (optional) maps each estimate
    onto a constraint set: Algorithm 4's zero-shot editing.
    """
    sigmas = _prepare(x, sigmas)
    levels = sigmas[:-1].tolist()
    if levels[-1] < sigma_min:
        raise ValueError(f"every positive sigma must be >= sigma_min={sigma_min}, got {levels[-1]:g}")
    for i, s in enumerate(levels):
        if i > 0:
            x = x + math.sqrt(s**2 - sigma_min**2) * randn_like(x, generator)
        x = _denoise(f, x, s, cond)
        if project is not None:
            x = project(x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": sigmas[i + 1].item(), "denoised": x})
    return x


@torch.no_grad()
def sample_lcm(f, x, sigmas, *, cond=None, generator=None, callback=None):
    """LCM's multistep sampler (Luo et al. 2023, Algorithm 3; diffusers' LCMScheduler.step).

    At each level: x0 = f(x, sigma_i); unless sigma_{i+1} = 0, re-noise with the forward process,
    x = x0 + sigma_{i+1} z (= sqrt(abar) x0 + sqrt(1 - abar) z in VP coordinates). Unlike CM's
    Algorithm 1 (sample_consistency) the noise is the full sigma_{i+1}, not sqrt(sigma^2 - sigma_min^2).
    """
    sigmas = _prepare(x, sigmas)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        denoised = _denoise(f, x, s, cond)
        x = denoised + s_next * randn_like(x, generator) if s_next > 0 else denoised
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised})
    return x


SAMPLERS = {
    "euler": sample_euler,
    "ddim": sample_euler,
    "heun": sample_heun,
    "ancestral": sample_ancestral,
    "ddpm": sample_ancestral,
    "dpm_solver_2": sample_dpm_solver_2,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler_maruyama": sample_euler_maruyama,
    "consistency": sample_consistency,
    "lcm": sample_lcm,
}


def get_sampler(name: str) -> Callable:
    """The sampler function by name (see SAMPLERS); 'ode_adaptive' returns (x, nfe) instead of x."""
    if name == "ode_adaptive":
        return sample_ode_adaptive
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS) + ['ode_adaptive']}")
    return SAMPLERS[name]


def search_consistency_sigmas(
    f, score_fn: Callable[[torch.Tensor], float], num_steps: int, *, noise: torch.Tensor,
    candidates=None, iters: int = 12, sigma_min: float = 0.002, sigma_max: float = 80.0,
    seed: int = 0, cond=None,
) -> torch.Tensor:
    """Song et al. 2023, sec. 6: greedy choice of multistep consistency levels, each by ternary search.

    Level k is chosen with levels 1..k-1 fixed, to minimise score_fn(samples) (lower is better,
    e.g. sliced W2 on a fixed evaluation set), by ternary search over ln sigma in
    (ln sigma_min, ln previous level) with `iters` shrinking rounds, or over `candidates` when
    given. Every evaluation uses the same start noise (`noise`, standard normal (B, ...)) and the
    same re-noising seed, so candidates are compared on common random numbers. Returns the float64
    grid [sigma_max, tau_2, ..., tau_num_steps, 0] for sample_consistency.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    levels = [float(sigma_max)]

    def score(tau: float) -> float:
        grid = torch.tensor(levels + [tau, 0.0], dtype=torch.float64)
        g = torch.Generator(device=noise.device).manual_seed(seed)
        with torch.no_grad():
            x = sample_consistency(f, noise * sigma_max, grid, cond=cond, generator=g, sigma_min=sigma_min)
        return float(score_fn(x))

    for _ in range(num_steps - 1):
        upper = levels[-1]
        if candidates is not None:
            pool = [float(c) for c in candidates if sigma_min <= float(c) < upper]
            if not pool:
                raise ValueError(f"no candidate lies in [sigma_min={sigma_min}, {upper:g}); pass smaller candidates")
            levels.append(min(pool, key=score))
            continue
        # Ternary search assumes the score is unimodal in ln(tau) on the interval (as the CM paper does).
        lo, hi = math.log(sigma_min), math.log(upper)
        for _ in range(iters):
            m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
            if score(math.exp(m1)) <= score(math.exp(m2)):
                hi = m2
            else:
                lo = m1
        levels.append(math.exp((lo + hi) / 2))
    return check_sigmas(torch.tensor(levels + [0.0], dtype=torch.float64))


__all__.append("search_consistency_sigmas")
