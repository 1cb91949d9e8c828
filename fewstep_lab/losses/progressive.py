"""Progressive distillation (Salimans & Ho 2022, "PD"), Algorithm 2, in sigma-space.

A student denoiser learns to do in ONE Euler (= DDIM) step from sigma_t to sigma_s what its
teacher does in two Euler steps, sigma_t -> sigma_mid -> sigma_s. An Euler step with denoised
value x0 is the affine map x_s = (sigma_s/sigma_t) x_t + (1 - sigma_s/sigma_t) x0, so the
denoiser output that reproduces the teacher's x_s is, in closed form (PD eq. 8 with alpha = 1,
the variance-exploding view),
    x0_tilde = (x_s - (sigma_s / sigma_t) x_t) / (1 - sigma_s / sigma_t)     (x0_tilde = x_s if sigma_s = 0).
Weighting (PD sec. 4, "truncated SNR"): L = max(||x0 - x0_hat||^2, ||eps - eps_hat||^2) =
max(SNR, 1) ||x0 - x0_hat||^2. In sigma-space x = x0 + sigma eps, so eps_hat = (x - x0_hat)/sigma
and ||eps - eps_hat||^2 = ||x0 - x0_hat||^2 / sigma^2: SNR = 1/sigma^2 (the same as the VP SNR
alpha^2/sigma_vp^2 under x_vp = x / sqrt(1 + sigma^2)), and the weight is max(1/sigma_t^2, 1).
Grids: `pd_sigmas(N)` puts N positive levels at t = i/N on EDM's rho-ramp and ends in 0, so
halving is exact: pd_sigmas(2N)[::2] == pd_sigmas(N), every student grid sits inside its teacher's.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from ..precond import append_dims
from ..sampling import euler_step, randn_like
from ..schedules import append_zero

__all__ = ["pd_sigmas", "pd_target", "truncated_snr_weight", "pd_loss", "progressive_distillation_rounds"]


def pd_sigmas(N: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """The N-step PD grid: sigma(i/N), i = N..1, on the rho-ramp from sigma_min to sigma_max, then 0 (float64)."""
    if not isinstance(N, int) or isinstance(N, bool) or N < 1:
        raise ValueError(f"N (sampling steps) must be an integer >= 1, got {N!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    t = torch.arange(N, 0, -1, dtype=torch.float64) / N
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (lo + t * (hi - lo)) ** rho
    sigmas[0] = sigma_max
    return append_zero(sigmas)


def pd_target(x_t, x_s, sigma_t, sigma_s) -> torch.Tensor:
    """PD eq. 8 in sigma-space: the x0 with which ONE Euler step maps x_t at sigma_t to x_s at sigma_s."""
    ratio = append_dims(sigma_s / sigma_t, x_t.ndim)
    return (x_s - ratio * x_t) / (1 - ratio)


def truncated_snr_weight(sigma: torch.Tensor) -> torch.Tensor:
    """PD's 'truncated SNR' weight max(SNR, 1) with SNR = 1/sigma^2 in sigma-space."""
    return torch.clamp(1 / sigma**2, min=1.0)


def pd_loss(student, teacher, x0, *, sigmas, generator=None, cond=None, weighting: str = "truncated_snr"):
    """PD Algorithm 2: per-sample losses (B,) for one student step per two teacher Euler steps.

    `sigmas` is the TEACHER's decreasing grid (2M steps, ending in 0); the student's grid is
    sigmas[::2]. A student interval t -> s is drawn uniformly; x_t = x0 + sigma_t eps; the target
    x0_tilde is pd_target of the teacher's two Euler steps; loss = w(sigma_t) ||student(x_t) - x0_tilde||^2
    (mean over coordinates).
    """
    sig = torch.as_tensor(sigmas, dtype=torch.float64)
    if sig.ndim != 1 or (len(sig) - 1) % 2 or len(sig) < 3 or sig[-1] != 0 or not (sig[1:] < sig[:-1]).all():
        raise ValueError("sigmas must be the teacher's decreasing grid of an even number of steps ending in 0, "
                         "e.g. pd_sigmas(2 * student_steps)")
    if weighting not in ("truncated_snr", "uniform"):
        raise ValueError(f"unknown weighting {weighting!r}; choose 'truncated_snr' or 'uniform'")
    B, dtype, device = x0.shape[0], x0.dtype, x0.device
    dev = generator.device if generator is not None else torch.device("cpu")
    i = torch.randint(0, (len(sig) - 1) // 2, (B,), generator=generator, device=dev).cpu()
    sig = sig.to(dtype)
    sigma_t, sigma_mid, sigma_s = sig[2 * i].to(device), sig[2 * i + 1].to(device), sig[2 * i + 2].to(device)
    x_t = x0 + append_dims(sigma_t, x0.ndim) * randn_like(x0, generator)
    with torch.no_grad():
        x_mid, _ = euler_step(teacher, x_t, sigma_t, sigma_mid, cond)
        # Euler to sigma_s, per sample: where sigma_s = 0 this is the teacher's denoised value.
        x_s, _ = euler_step(teacher, x_mid, sigma_mid, sigma_s, cond)
        target = pd_target(x_t, x_s, sigma_t, sigma_s)
    err = ((student(x_t, sigma_t, cond) - target) ** 2).reshape(B, -1).mean(1)
    return err * truncated_snr_weight(sigma_t) if weighting == "truncated_snr" else err


def progressive_distillation_rounds(
    teacher, train_round: Callable, *, teacher_steps: int = 64, student_steps: int = 1,
    make_student: Callable = copy.deepcopy, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
) -> dict:
    """PD Algorithm 2's outer loop: halve the steps each round, each student initialised from its teacher.

    Round by round, student = make_student(teacher) (a copy of the teacher's weights by default),
    student = train_round(student, teacher, pd_sigmas(N)) with N the teacher's step count, and the
    student becomes the next teacher. Returns {student steps: student} for every round.
    """
    ratio = teacher_steps // max(student_steps, 1)
    if student_steps < 1 or ratio < 2 or ratio * student_steps != teacher_steps or ratio & (ratio - 1):
        raise ValueError(f"teacher_steps / student_steps must be a power of two >= 2, "
                         f"got {teacher_steps} / {student_steps}")
    students, N = {}, teacher_steps
    while N > student_steps:
        student = train_round(make_student(teacher), teacher, pd_sigmas(N, sigma_min, sigma_max, rho))
        N //= 2
        students[N] = teacher = student
    return students
