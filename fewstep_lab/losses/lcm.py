"""Latent consistency distillation (LCD), Algorithm 1 of Luo et al. 2023 ("LCM"), as a per-sample loss.

LCM distils the guided PF-ODE (LCM sec. 4.2: the teacher's noise prediction replaced by
classifier-free guidance's (1 + w) eps(c) - w eps(∅)) into a consistency function f(x, w, c,
sigma) that takes the guidance scale w as an input. Per sample: w ~ U[w_min, w_max]; a level
n ~ U{1..N-k} of the teacher's N-level grid (here EDM eq. 5's rho-ramp as CM uses it, ``cm_sigmas``);
x_{n+k} = x0 + sigma_{n+k} z; x_hat_n = ONE step of the ODE solver with the GUIDED teacher
D_w = D(∅) + (1 + w)(D(c) - D(∅)) (``guidance.CFGDenoiser``) from sigma_{n+k} to sigma_n, that
"skipping step" spanning k grid intervals (LCM sec. 4.3); loss d(f(x_{n+k}, sigma_{n+k}, (c, w)),
f^-(x_hat_n, sigma_n, (c, w))) with the EMA target f^- under stop-gradient. With Euler (= DDIM, LCM's
choice) stepping with D_w equals LCM's x_{n+k} + (1 + w) Phi(c) - w Phi(∅), since an Euler step is
affine in D; with Heun the guided teacher is applied at both stages (a step of the guided ODE).
LCM's code draws n only at multiples of k (its DDIM grid of N/k levels); Algorithm 1 and this
function draw any n. k = 1 and w = 0 give CD's neighbouring levels of the conditional teacher.

The grid: LCM distils on the teacher's own discrete schedule (Stable Diffusion's 1000 DDPM
timesteps, k = 20, i.e. DDIM's 50-step grid): pass ``sigmas=`` the teacher's ascending levels (for a
DDPM teacher ``DiscreteSchedule.sigmas``, sigma at t = 0..T-1); k then counts grid intervals
(timesteps). Without it the grid is EDM eq. 5's rho-ramp of N levels, as CM uses it (an EDM teacher).
With ``null_label=None`` the teacher is used as given, unguided: ``losses.consistency.data_teacher(x0)``
makes this consistency TRAINING with w as an input (LCF, ``methods/lcf.py``).
"""

from __future__ import annotations

import torch

from ..guidance import CFGDenoiser
from ..precond import append_dims
from ..sampling import randn_like
from .consistency import SOLVERS, _gen_device, _same_randomness, cm_sigmas, get_distance

__all__ = ["lcd_loss"]


def lcd_loss(
    f, f_target, teacher, x0, labels, *, N: int | None = None, k: int = 1, w_min: float = 0.0,
    w_max: float = 8.0, null_label: int | None, solver: str = "euler", distance="l2", generator=None,
    sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, sigmas=None,
) -> torch.Tensor:
    """LCM Algorithm 1 (LCD): per-sample losses (B,) for x0 (B, ...) with class labels (B,) long.

    The student and target take cond = (labels, w) with w (B,); the teacher takes labels (and
    null_label for ∅; null_label=None: the teacher unguided, as given). Randomness is drawn in CD's
    order (n, z, dropout seed; then w), so with k = 1 and w_min = w_max = 0 this is cd_loss of the
    conditional teacher on the same grid, up to rounding. sigmas: the teacher's N ascending levels
    (float64; then N may be omitted), else cm_sigmas(N, sigma_min, sigma_max, rho).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    if sigmas is None:
        if N is None:
            raise ValueError("pass N (the levels of EDM's rho-ramp) or sigmas (the teacher's own grid)")
        sigmas = cm_sigmas(N, sigma_min, sigma_max, rho)
    else:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        if sigmas.ndim != 1 or len(sigmas) < 2 or not bool((sigmas[0] > 0) & (sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("sigmas must be the teacher's grid: >= 2 positive, strictly increasing levels")
        if N is not None and N != len(sigmas):
            raise ValueError(f"N = {N} but the grid sigmas has {len(sigmas)} levels; omit N")
        N = len(sigmas)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= N - 1:
        raise ValueError(f"the skipping step k must be an integer in 1..N-1 = 1..{N - 1}, got {k!r}")
    if not w_min <= w_max:
        raise ValueError(f"need w_min <= w_max, got {w_min}, {w_max}")
    d = get_distance(distance)
    B, dtype, device, gdev = x0.shape[0], x0.dtype, x0.device, _gen_device(generator)
    n = torch.randint(0, N - k, (B,), generator=generator, device=gdev).cpu()  # lower level index
    sigma, sigma_next = (sigmas[m].to(dtype).to(device) for m in (n, n + k))  # sigma_n < sigma_{n+k}
    z = randn_like(x0, generator)
    x_next = x0 + append_dims(sigma_next, x0.ndim) * z
    # Same dropout masks for student and target (see cd_loss).
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=gdev))
    w = (w_min + (w_max - w_min) * torch.rand(B, generator=generator, device=gdev, dtype=torch.float64)).to(
        dtype).to(device)
    labels = labels.to(device)
    with torch.no_grad():
        # The guided teacher moves x_{n+k} down k levels with the samplers' own step function.
        D = teacher if null_label is None else CFGDenoiser(teacher, w, null_label)
        x_hat, _ = SOLVERS[solver](D, x_next, sigma_next, sigma, labels)
    with _same_randomness(seed, device):
        pred = f(x_next, sigma_next, (labels, w))
    with torch.no_grad(), _same_randomness(seed, device):
        target = f_target(x_hat, sigma, (labels, w))
    return d(pred, target.detach())
