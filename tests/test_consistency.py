"""Consistency models (Song et al. 2023; Song & Dhariwal 2023): losses, schedules, sampling, toy glue.

Closed forms do the checking: the exact consistency function of Gaussian data, the exact
denoiser of a point mass (CT = CD with the data point as teacher), and diffusers'
CMStochasticIterativeScheduler as an independent implementation of multistep sampling.
"""

import math
from dataclasses import replace

import pytest
import torch
from diffusers import CMStochasticIterativeScheduler
from torch import nn

from fewstep_lab.data.toy2d import gaussian
from fewstep_lab.losses.consistency import (cd_loss, cm_sigmas, ct_loss, ct_mu, ct_N, data_teacher, get_distance,
                                            ict_loss, ict_N, l1, l2, lognormal_index_probs, pseudo_huber)
from fewstep_lab.precond import Precond, consistency_scalings
from fewstep_lab.sampling import sample_consistency, search_consistency_sigmas
from fewstep_lab.schedules import karras_sigmas
from fewstep_lab.pipeline import build_model, default_sigmas, load_run, make_run, train_run
from helpers import DT, RandomNet

torch.set_num_threads(1)
SMIN, SMAX = 0.002, 80.0


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def exact_f(mu, s, scale=1.0):
    """The consistency function of N(mu, s^2 I) data: the PF-ODE map to sigma_min (scale != 1: a wrong s)."""
    s = s * scale

    def f(x, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])[:, None]
        return mu + (x - mu) * math.sqrt(s**2 + SMIN**2) / torch.sqrt(s**2 + sigma**2)
    return f


class Recorder:
    """Wraps f and records every (x, sigma) it is called with."""

    def __init__(self, f):
        self.f, self.calls = f, []

    def __call__(self, x, sigma, cond=None):
        out = self.f(x, sigma, cond)
        self.calls.append((x.detach().clone(), torch.as_tensor(sigma).clone(), out.requires_grad))
        return out


# ---------------------------------------------------------------- boundary condition, grids


@pytest.mark.parametrize("shape", [(16, 2), (4, 3, 5, 5)])
def test_boundary_condition_holds_exactly_for_any_network(shape):
    f = Precond(RandomNet(shape[1:], seed=1), consistency_scalings)
    x = 3 * torch.randn(shape, generator=gen(1), dtype=DT)
    assert torch.equal(f(x, SMIN), x)
    assert not torch.allclose(f(x, 1.0), x)  # the network does act away from sigma_min
    toy = build_model(make_run("cd", "8gaussians", "smoke"))
    x32 = torch.randn(64, 2, generator=gen(2))
    assert torch.equal(toy(x32, SMIN), x32)


def test_cm_sigmas_is_the_reversed_karras_grid():
    s = cm_sigmas(18)
    assert s[0] == SMIN and s[-1] == SMAX and len(s) == 18 and (s[1:] > s[:-1]).all()
    assert torch.allclose(s.float(), karras_sigmas(18)[:-1].flip(0), rtol=1e-6)
    with pytest.raises(ValueError, match="N must be an integer >= 2"):
        cm_sigmas(1)


# ---------------------------------------------------------------- schedules N(k), mu(k)


def test_ct_N_and_mu_endpoints_and_monotone():
    K = 1000
    Ns = [ct_N(k, K) for k in range(K + 1)]
    mus = [ct_mu(k, K) for k in range(K + 1)]
    assert Ns[0] == 2 and Ns[-1] == 151  # s0 and s1 + 1
    assert mus[0] == pytest.approx(0.9) and mus[-1] == pytest.approx(math.exp(2 * math.log(0.9) / 151))
    assert all(a <= b for a, b in zip(Ns, Ns[1:])) and all(a <= b for a, b in zip(mus, mus[1:]))
    assert ct_N(K // 2, K, s0=10, s1=20) == math.ceil(math.sqrt(0.5 * (21**2 - 100) + 100) - 1) + 1
    with pytest.raises(ValueError, match="0 <= k <= K"):
        ct_N(11, 10)
    # A smaller mu0 lowers the whole schedule, which still ends below 1 and rises monotonically.
    low = [ct_mu(k, K, mu0=0.01) for k in range(K + 1)]
    assert low[0] == pytest.approx(0.01) and low[-1] == pytest.approx(0.01 ** (2 / 151))
    assert all(a <= b for a, b in zip(low, low[1:])) and all(a < b for a, b in zip(low, mus))
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="mu0 is the target EMA decay"):
            ct_mu(0, K, mu0=bad)


def test_ict_N_exponential_curriculum():
    K = 8000  # K' = floor(8000 / (log2(128) + 1)) = 1000
    Ns = [ict_N(k, K) for k in range(K + 1)]
    assert Ns[0] == 11 and Ns[-1] == 1281
    assert all(a <= b for a, b in zip(Ns, Ns[1:]))
    assert [ict_N(1000 * j, K) for j in range(9)] == [11, 21, 41, 81, 161, 321, 641, 1281, 1281]
    assert ict_N(999, K) == 11


def test_lognormal_index_probs():
    s = cm_sigmas(200)
    p = lognormal_index_probs(s)
    assert p.shape == (199,) and (p >= 0).all() and p.sum().item() == pytest.approx(1.0, abs=1e-12)
    peak = (p / (s[1:].log() - s[:-1].log())).argmax()  # the density of ln sigma peaks at P_mean
    assert s[peak - 1] <= math.exp(-1.1) <= s[peak + 2]
    # the probability mass of an interval is the lognormal mass between its ends
    a, b = s[100].log().item(), s[101].log().item()
    cdf = lambda v: 0.5 * math.erf((v + 1.1) / (2 * math.sqrt(2)))  # noqa: E731  (P_mean -1.1, P_std 2)
    mass, total = cdf(b) - cdf(a), cdf(math.log(SMAX)) - cdf(math.log(SMIN))
    assert p[100].item() == pytest.approx(mass / total, rel=1e-9)


# ---------------------------------------------------------------- distances


def test_distances():
    x = torch.zeros(3, 4, dtype=DT)
    y = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [0.001, 0, 0, 0]], dtype=DT)
    assert torch.allclose(l2(x, y), torch.tensor([0.25, 1.0, 0.25e-6], dtype=DT))
    assert torch.allclose(l1(x, y), torch.tensor([0.25, 1.0, 0.00025], dtype=DT))
    c = 0.00054 * 2  # default for dim 4: 0.00054 sqrt(4)
    ph = pseudo_huber()(x, y)
    assert torch.allclose(ph, torch.sqrt(torch.tensor([1.0, 4.0, 1e-6], dtype=DT) + c**2) - c)
    assert ph[1].item() == pytest.approx(2.0, abs=c)  # ~ the l2 norm for large differences
    assert get_distance("pseudo_huber", c=0.5)(x, y)[0].item() == pytest.approx(math.sqrt(1.25) - 0.5)
    with pytest.raises(ValueError, match="never downloads"):
        get_distance("lpips")
    with pytest.raises(ValueError, match="unknown distance"):
        get_distance("l3")


def test_lpips_distance_uses_the_given_module_at_224():
    seen = []

    class FakeLPIPS(nn.Module):
        def forward(self, a, b):
            seen.append(a.shape)
            return ((a - b) ** 2).mean((1, 2, 3), keepdim=True)

    d = get_distance("lpips", net=FakeLPIPS())
    out = d(torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8))
    assert seen == [torch.Size([2, 3, 224, 224])] and torch.allclose(out, torch.ones(2))
    no_resize = get_distance("lpips", net=FakeLPIPS(), resize=None)
    assert no_resize(torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)).shape == (2,) and seen[-1][-1] == 8


# ---------------------------------------------------------------- CD and CT losses


def test_ct_target_is_the_cd_target_with_the_data_point_as_teacher():
    x0 = torch.randn(512, 2, generator=gen(3), dtype=DT)
    f = Precond(RandomNet((2,), seed=2), consistency_scalings)
    target = Recorder(f)
    ct = ct_loss(f, target, x0, N=30, generator=gen(4))
    (x_hat, sigma, grad), = target.calls
    target2 = Recorder(f)
    cd = cd_loss(f, target2, data_teacher(x0), x0, N=30, solver="euler", generator=gen(4))
    assert torch.equal(ct, cd) and torch.equal(target2.calls[0][0], x_hat)
    # ... and one Euler step with D = x0 lands exactly on x0 + sigma_n z (same z as the student's input).
    student = Recorder(f)
    ct_loss(student, f, x0, N=30, generator=gen(4))
    x_next, sigma_next, _ = student.calls[0]
    z = (x_next - x0) / sigma_next[:, None]
    assert torch.allclose(x_hat, x0 + sigma[:, None] * z, rtol=0, atol=1e-12)
    grid = cm_sigmas(30)
    idx = torch.searchsorted(grid, sigma)
    assert torch.equal(grid[idx], sigma) and torch.equal(grid[idx + 1], sigma_next)  # neighbouring levels
    assert not grad  # the target is computed under stop-gradient


def test_cd_loss_of_the_exact_gaussian_consistency_function():
    mu, s = torch.tensor([0.3, -0.2], dtype=DT), 0.5
    data = gaussian((0.3, -0.2), s)
    x0 = data.sample(4096, gen(5)).to(DT)
    kw = dict(N=1000, generator=gen(6))
    exact = cd_loss(exact_f(mu, s), exact_f(mu, s), data.denoiser, x0, solver="heun", **kw).mean()
    euler = cd_loss(exact_f(mu, s), exact_f(mu, s), data.denoiser, x0, solver="euler", **kw).mean()
    wrong = cd_loss(exact_f(mu, s, 1.1), exact_f(mu, s, 1.1), data.denoiser, x0, solver="heun", **kw).mean()
    assert exact < 1e-12 and exact < euler / 100  # Heun's O(h^3) local error vs Euler's O(h^2)
    assert wrong > 1e6 * exact


def test_ict_weighting_and_lognormal_levels():
    x0 = torch.randn(20000, 2, generator=gen(7), dtype=DT)
    f = exact_f(torch.zeros(2, dtype=DT), 0.5)
    rec = Recorder(f)
    uni = ct_loss(rec, f, x0, N=11, generator=gen(8), index_sampling="lognormal")
    ict = ct_loss(f, f, x0, N=11, generator=gen(8), index_sampling="lognormal", weighting="ict")
    x_next, sigma_next, _ = rec.calls[0]
    grid = cm_sigmas(11)
    n = torch.searchsorted(grid, sigma_next) - 1
    assert torch.allclose(ict, uni / (grid[n + 1] - grid[n]))
    freq = torch.bincount(n, minlength=10).double() / len(n)
    p = lognormal_index_probs(grid)
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / len(n)).sqrt() + 1e-12).all()
    custom = ct_loss(f, f, x0, N=11, generator=gen(8), index_sampling="lognormal", weighting=lambda a, b: 2 * b)
    assert torch.allclose(custom, uni * 2 * sigma_next)


def test_ict_loss_is_ct_with_the_improved_choices():
    x0 = torch.randn(64, 2, generator=gen(9))
    f = Precond(RandomNet((2,), seed=3, dtype=torch.float32), consistency_scalings)
    a = ict_loss(f, x0, k=500, K=1000, generator=gen(1))
    b = ct_loss(f, f, x0, N=ict_N(500, 1000), distance=pseudo_huber(), weighting="ict", generator=gen(1),
                index_sampling="lognormal")
    assert torch.equal(a, b)


def test_student_gets_gradients_and_shares_dropout_with_the_target():
    masks = []

    class DropNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.drop = nn.Dropout(0.5)

        def forward(self, x, c_noise, cond=None):
            h = self.drop(torch.ones(x.shape[0], 16))
            masks.append(h != 0)
            return self.lin(torch.cat([x, c_noise[:, None]], 1)) * h[:, :2]

    f = Precond(DropNet(), consistency_scalings).train()
    x0 = torch.randn(32, 2, generator=gen(10))
    state = torch.get_rng_state()
    loss = ct_loss(f, f, x0, N=20, generator=gen(11)).mean()
    assert torch.equal(torch.get_rng_state(), state)  # dropout randomness came from the loss's generator
    assert len(masks) == 2 and torch.equal(masks[0], masks[1]) and 0 < masks[0].float().mean() < 1
    ct_loss(f, f, x0, N=20, generator=gen(12))
    assert not torch.equal(masks[2], masks[0])  # a different generator, different masks
    loss.backward()
    assert f.net.lin.weight.grad is not None and f.net.lin.weight.grad.abs().sum() > 0


def test_cd_loss_rejects_unknown_options():
    x0 = torch.zeros(4, 2)
    f = exact_f(torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="unknown solver"):
        cd_loss(f, f, f, x0, N=5, solver="rk4")
    with pytest.raises(ValueError, match="unknown weighting"):
        cd_loss(f, f, f, x0, N=5, weighting="snr")
    with pytest.raises(ValueError, match="unknown index_sampling"):
        cd_loss(f, f, f, x0, N=5, index_sampling="beta")


# ---------------------------------------------------------------- multistep sampling


def test_one_step_sampling_is_f_at_sigma_max():
    f = Precond(RandomNet((2,), seed=4), consistency_scalings)
    x = SMAX * torch.randn(50, 2, generator=gen(13), dtype=DT)
    assert torch.equal(sample_consistency(f, x, torch.tensor([SMAX, 0.0])), f(x, SMAX))


def test_multistep_renoises_to_the_requested_levels():
    rec = Recorder(lambda x, sigma, cond=None: torch.full_like(x, 0.7))
    grid = torch.tensor([SMAX, 3.0, 0.4, 0.0])
    x = SMAX * torch.randn(200_000, 1, generator=gen(14), dtype=DT)
    sample_consistency(rec, x, grid, generator=gen(15))
    assert [c[1].unique().item() for c in rec.calls] == pytest.approx([80.0, 3.0, 0.4])
    for (xi, _, _), tau in zip(rec.calls[1:], (3.0, 0.4)):
        var, se = xi.var().item(), math.sqrt(2 / len(xi)) * (tau**2 - SMIN**2)
        assert abs(var - (tau**2 - SMIN**2)) < 5 * se and abs(xi.mean().item() - 0.7) < 5 * tau / math.sqrt(len(xi))


# diffusers' custom timesteps are indices of its 40-level ramp read in reverse: [0] is one step
# at sigma_max, [30, 17, 6, 0] visits ramp positions 0, 6, 17, 30 (decreasing sigma).
@pytest.mark.parametrize("shape, timesteps", [((16, 2), [0]), ((16, 2), [30, 17, 6, 0]), ((4, 2, 5, 5), [28, 9, 0])])
def test_sample_consistency_matches_diffusers(shape, timesteps):
    net = RandomNet(shape[1:], seed=5)
    sched = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=SMIN, sigma_max=SMAX, sigma_data=0.5,
                                           clip_denoised=False)
    sched.set_timesteps(timesteps=timesteps)
    # diffusers keeps sigmas in float32; recover its float64 levels from its timesteps (250 ln sigma).
    sig64 = torch.exp(sched.timesteps.to(DT) / 250)
    assert torch.allclose(sig64, sched.sigmas[:-1].to(DT), rtol=1e-6) and sig64[0].item() == pytest.approx(SMAX)
    sched.sigmas = torch.cat([sig64, torch.tensor([SMIN], dtype=DT)])
    x_T = SMAX * torch.randn(shape, generator=gen(16), dtype=DT)

    theirs, x = [], x_T.clone()
    g = gen(17)
    for t in sched.timesteps:
        theirs.append(x)
        scaled = sched.scale_model_input(x, t)
        out = net(scaled, (t / 1000).expand(shape[0]))  # t / 1000 = ln(sigma) / 4 = our c_noise
        x = sched.step(out, t, x, generator=g).prev_sample
    rec = Recorder(Precond(net, consistency_scalings))
    ours = sample_consistency(rec, x_T, torch.cat([sig64, torch.zeros(1, dtype=DT)]), generator=gen(17))
    assert len(rec.calls) == len(theirs)
    for i, (ours_in, theirs_in) in enumerate(zip([c[0] for c in rec.calls], theirs)):
        assert torch.allclose(ours_in, theirs_in, rtol=1e-10, atol=1e-10), f"step {i}"
    assert torch.allclose(ours, x, rtol=1e-10, atol=1e-10)
    assert (ours - x_T).abs().max() > 1  # the network moves the samples: not a vacuous comparison


def test_search_consistency_sigmas_finds_the_known_optimum():
    # f maps sigma_max to 0 and is the identity below: after 2 steps x = sqrt(tau^2 - sigma_min^2) z,
    # so the variance-1 score is minimised at tau^2 = 1 / var(z) + sigma_min^2 for the fixed z.
    def f(x, sigma, cond=None):
        return torch.zeros_like(x) if float(torch.as_tensor(sigma).reshape(-1)[0]) == SMAX else x

    def score(x):
        return (x.var() - 1).abs().item()

    noise = torch.randn(4000, 2, generator=gen(18), dtype=DT)
    z = torch.randn(4000, 2, generator=gen(3), dtype=DT)  # the re-noising draw of seed 3
    best = math.sqrt(1 / z.var().item() + SMIN**2)
    grid = search_consistency_sigmas(f, score, 2, noise=noise, iters=30, seed=3)
    assert grid[0] == SMAX and grid[-1] == 0 and len(grid) == 3
    assert grid[1].item() == pytest.approx(best, rel=1e-4)
    grid = search_consistency_sigmas(f, score, 2, noise=noise, candidates=[5.0, 1.3, 1.0, 0.7], seed=3)
    assert grid[1].item() == 1.0
    grid3 = search_consistency_sigmas(f, score, 3, noise=noise, iters=20, seed=3)
    assert len(grid3) == 4 and (grid3[1:] < grid3[:-1]).all()
    assert grid3[2] < 0.05  # any third level adds variance: the search pushes it towards sigma_min
    with pytest.raises(ValueError, match="no candidate"):
        search_consistency_sigmas(f, score, 2, noise=noise, candidates=[100.0])


# ---------------------------------------------------------------- toy glue (smoke runs)


def _finite_samples(f, run, steps=1):
    sigmas = default_sigmas(run, steps)
    x = sigmas[0] * torch.randn(500, 2, generator=gen(19))
    with torch.no_grad():
        out = sample_consistency(f, x, sigmas, generator=gen(20))
    assert out.shape == (500, 2) and torch.isfinite(out).all()
    return out


def test_initial_weights_are_a_function_of_the_seed():
    state = torch.get_rng_state()
    a, b, c = (build_model(make_run("ict", "8gaussians", "smoke", seed=s)) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.net.inp.weight, b.net.inp.weight) and not torch.equal(a.net.inp.weight, c.net.inp.weight)


def test_smoke_cd_from_exact_and_trained_teachers(tmp_path):
    exact = make_run("cd", "gaussian", "smoke", steps=20)
    f, state = train_run(exact, teacher=gaussian().denoiser, progress=False, checkpoint_path=tmp_path / "exact.pt")
    _finite_samples(f, exact, 2)
    # The exact denoiser has no weights to copy: the stored run says so.
    assert load_run(tmp_path / "exact.pt")[1].recipe.init_from_teacher is False
    teacher = build_model(make_run("edm", "8gaussians", "smoke"))
    r2 = make_run("cd", "8gaussians", "smoke", steps=20)
    assert r2.recipe.init_from_teacher
    f0, _ = train_run(make_run("cd", "8gaussians", "smoke", steps=0), teacher=teacher, progress=False)
    assert torch.equal(f0.net.inp.weight, teacher.net.inp.weight)  # the student starts from the teacher's weights
    f2, state2 = train_run(r2, teacher=teacher, progress=False, checkpoint_path=tmp_path / "cd.pt")
    assert state2.step == 20 and all(math.isfinite(v) for _, v in state2.losses)
    g, r_loaded = load_run(tmp_path / "cd.pt")
    assert r_loaded == r2 and r_loaded.method == "cd"
    x = torch.randn(8, 2)
    assert torch.equal(g(x, 3.0), f2(x, 3.0))
    small = build_model(make_run("edm", "8gaussians", "smoke", hidden=16))
    with pytest.raises(ValueError, match="init_from_teacher=False"):
        train_run(r2, teacher=small, progress=False)


@pytest.mark.parametrize("method", ["ct", "ict"])
def test_smoke_ct_and_ict(method, tmp_path):
    run = make_run(method, "8gaussians", "smoke", steps=20)
    f, state = train_run(run, progress=False, checkpoint_path=tmp_path / "ct.pt")
    assert state.step == 20 and ("target" in state.emas) == (method == "ct")
    _finite_samples(f, run)
    g, r_loaded = load_run(tmp_path / "ct.pt")
    assert type(r_loaded.recipe) is type(run.recipe) and r_loaded == run
