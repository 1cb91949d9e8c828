"""diffusers' DDIM and DDPM schedulers as an independent oracle for the sigma-space view.

A random epsilon-network wrapped by DiscreteEpsDenoiser and sampled with sample_euler (resp.
sample_ancestral) must reproduce DDIMScheduler with eta = 0 (resp. DDPMScheduler with
variance 'fixed_small') step for step, once each iterate is mapped back to VP scale,
x_vp = x / sqrt(1 + sigma^2). Everything runs in float64; the schedulers get the same float64
alphas_cumprod (theirs are float32, which would cap agreement at ~1e-7).
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from fewstep_lab.precond import DiscreteEpsDenoiser
from fewstep_lab.sampling import sample_ancestral, sample_euler
from fewstep_lab.schedules import DiscreteSchedule
from helpers import DT, EpsConv, EpsMLP

torch.set_num_threads(1)
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def _float64(scheduler):
    """Give a diffusers scheduler float64 alphas_cumprod; returns them."""
    ac = scheduler.alphas_cumprod.to(DT)
    scheduler.alphas_cumprod = ac
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=DT)  # DDIM, set_alpha_to_one=True
    scheduler.one = torch.tensor(1.0, dtype=DT)  # DDPM
    return ac


def _vp(x, sigma):
    return x / math.sqrt(1 + sigma**2)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


DDIM_CASES = [(s, n, "mlp") for s in ("linear", "cosine") for n in (10, 50)] + [
    (s, 10, "conv") for s in ("linear", "cosine")]  # 2-D points and 2x4x4 images


@pytest.mark.parametrize("schedule, n, net_kind", DDIM_CASES)
def test_euler_is_ddim_step_for_step(schedule, n, net_kind):
    sched = DDIMScheduler(beta_schedule=BETA_SCHEDULES[schedule], clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(n)
    ac = _float64(sched)
    eps_model, shape = (EpsMLP(), (64, 2)) if net_kind == "mlp" else (EpsConv(), (8, 2, 4, 4))
    grid = DiscreteSchedule(ac).ddim_sigmas(n)
    assert len(grid) == n + 1 and len(sched.timesteps) == n

    x_T_vp = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    ours = []
    sample_euler(DiscreteEpsDenoiser(eps_model, ac), x_T_vp * math.sqrt(1 + grid[0].item() ** 2), grid,
                 callback=lambda d: ours.append(_vp(d["x"], d["sigma_next"])))
    assert len(ours) == n

    x_vp = x_T_vp.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            x_vp = sched.step(eps_model(x_vp, t.to(DT)), t, x_vp, eta=0.0).prev_sample
            assert _rel(ours[i], x_vp) < 1e-12, f"step {i} (t={int(t)}): relative error {_rel(ours[i], x_vp):.2e}"
    # The random network makes the trajectory move: not a vacuous comparison.
    assert _rel(x_vp, x_T_vp) > 0.1


def _ddpm(schedule):
    sched = DDPMScheduler(beta_schedule=BETA_SCHEDULES[schedule], clip_sample=False, variance_type="fixed_small")
    return sched, _float64(sched)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("t", [999, 500, 20, 1, 0])
def test_ancestral_step_is_ddpm_posterior(schedule, t):
    """Both steps are x_prev = m + s * z; two seeds of shared noise z pin down m and s per coordinate."""
    sched, ac = _ddpm(schedule)
    eps_model = EpsMLP(seed=3)
    D = DiscreteEpsDenoiser(eps_model, ac)
    ds = DiscreteSchedule(ac)
    grid = ds.sigmas_for_timesteps(torch.arange(t, max(t - 2, -1), -1))  # [sigma_t, (sigma_{t-1},) 0]
    x_t_vp = 2 * torch.randn(256, 2, generator=torch.Generator().manual_seed(5), dtype=DT)

    def ours(seed):
        out = []
        sample_ancestral(D, x_t_vp * math.sqrt(1 + grid[0].item() ** 2), grid,
                         generator=torch.Generator().manual_seed(seed),
                         callback=lambda d: out.append(_vp(d["x"], d["sigma_next"])))
        return out[0]

    def theirs(seed):
        with torch.no_grad():
            return sched.step(eps_model(x_t_vp, torch.tensor(float(t), dtype=DT)), t, x_t_vp,
                              generator=torch.Generator().manual_seed(seed)).prev_sample

    z1 = torch.randn(256, 2, generator=torch.Generator().manual_seed(11), dtype=DT)
    z2 = torch.randn(256, 2, generator=torch.Generator().manual_seed(12), dtype=DT)
    for f in (ours, theirs):
        a, b = f(11), f(12)
        std = (a - b) / (z1 - z2)
        mean = a - std * z1
        if f is ours:
            m_ours, s_ours = mean, std
        else:
            m_theirs, s_theirs = mean, std
    assert _rel(m_ours, m_theirs) < 1e-10
    # Closed form of the posterior variance (Ho et al. 2020, eq. 7): beta~_t.
    a_t, a_prev = ac[t], (ac[t - 1] if t > 0 else torch.tensor(1.0, dtype=DT))
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    assert torch.allclose(s_ours, var.sqrt().expand_as(s_ours), rtol=1e-8, atol=1e-14)
    assert torch.allclose(s_theirs, var.sqrt().expand_as(s_theirs), rtol=1e-8, atol=1e-14)


def test_ancestral_full_chain_is_ddpm():
    """All 1000 steps with the same seeded noise in both: identical trajectories."""
    sched, ac = _ddpm("linear")
    eps_model = EpsMLP(seed=4)
    grid = DiscreteSchedule(ac).sigmas_for_timesteps(torch.arange(999, -1, -1))
    x_T_vp = torch.randn(32, 2, generator=torch.Generator().manual_seed(2), dtype=DT)
    ours = []
    sample_ancestral(DiscreteEpsDenoiser(eps_model, ac), x_T_vp * math.sqrt(1 + grid[0].item() ** 2), grid,
                     generator=torch.Generator().manual_seed(7),
                     callback=lambda d: ours.append(_vp(d["x"], d["sigma_next"])))
    g = torch.Generator().manual_seed(7)
    x_vp = x_T_vp.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            x_vp = sched.step(eps_model(x_vp, t.to(DT)), t, x_vp, generator=g).prev_sample
            if i % 100 == 0 or i == 999:
                assert _rel(ours[i], x_vp) < 1e-9, f"step {i}: relative error {_rel(ours[i], x_vp):.2e}"
