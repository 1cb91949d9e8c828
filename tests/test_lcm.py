"""Latent consistency models on labelled 2-D data (issue 10, sections 2 and 6): scalings, w-embedding,
LCD against CD, the skipping step, sample_lcm against diffusers' LCMScheduler, the pipeline."""

import math

import pytest
import torch
from diffusers import LCMScheduler

from fewstep_lab.data.labelled import eight_gaussians_4class
from fewstep_lab.guidance import CFGDenoiser
from fewstep_lab.losses.consistency import cd_loss, cm_sigmas
from fewstep_lab.losses.lcm import lcd_loss
from fewstep_lab.nets.mlp import MLP
from fewstep_lab.pipeline import load_run, make_run, sample, train_run
from fewstep_lab.precond import Precond, get_scalings, lcm_scalings
from fewstep_lab.sampling import euler_step, get_sampler, sample_lcm
from helpers import DT, EpsMLP

torch.set_num_threads(1)
MIX = eight_gaussians_4class()
OLD_MLP_KEYS = ['blocks.0.1.bias', 'blocks.0.1.weight', 'blocks.0.3.bias', 'blocks.0.3.weight', 'blocks.1.1.bias',
                'blocks.1.1.weight', 'blocks.1.3.bias', 'blocks.1.3.weight', 'blocks.2.1.bias', 'blocks.2.1.weight',
                'blocks.2.3.bias', 'blocks.2.3.weight', 'blocks.3.1.bias', 'blocks.3.1.weight', 'blocks.3.3.bias',
                'blocks.3.3.weight', 'emb_mlp.0.bias', 'emb_mlp.0.weight', 'emb_mlp.2.bias', 'emb_mlp.2.weight',
                'inp.bias', 'inp.weight', 'out.1.bias', 'out.1.weight']  # the MLP's keys before the w-embedding


def _student(seed=0, **kw):
    torch.manual_seed(seed)
    return Precond(MLP(hidden=32, depth=2, num_classes=4, guidance_embed=True, **kw),
                   get_scalings("lcm", sigma_min=0.002))


def test_mlp_without_w_embedding_keeps_its_state_dict():
    assert sorted(MLP().state_dict()) == OLD_MLP_KEYS
    assert sorted(MLP(num_classes=4).state_dict()) == sorted(OLD_MLP_KEYS + ["label.weight"])
    extra = set(MLP(guidance_embed=True).state_dict()) - set(OLD_MLP_KEYS)
    assert extra and all(k.startswith("w_") for k in extra)


def test_w_branch_starts_at_zero_and_then_matters():
    torch.manual_seed(0)
    plain, guided = MLP(hidden=32, num_classes=4), MLP(hidden=32, num_classes=4, guidance_embed=True)
    guided.load_state_dict(plain.state_dict(), strict=False)
    x, c, y = torch.randn(8, 2), torch.rand(8), torch.arange(8) % 4
    for w in (0.0, 7.0, torch.linspace(0, 7, 8)):
        assert torch.equal(guided(x, c, (y, w)), plain(x, c, y))
    with pytest.raises(ValueError, match=r"\(labels, w\)"):
        guided(x, c, y)
    torch.nn.init.normal_(guided.w_mlp[-1].weight)
    assert not torch.allclose(guided(x, c, (y, 0.0)), guided(x, c, (y, 7.0)))


def test_lcm_scalings_boundary_condition_is_exact():
    f = _student()
    torch.nn.init.normal_(f.net.w_mlp[-1].weight)
    for dtype in (torch.float32, torch.float64):
        f = f.to(dtype)
        x = torch.randn(16, 2, dtype=dtype)
        out = f(x, 0.002, (torch.arange(16) % 4, torch.linspace(0, 7, 16)))
        assert torch.equal(out, x)
    s = torch.tensor([0.002, 0.05, 0.5, 2.0, 80.0], dtype=DT)
    c_skip, c_out, c_in, c_noise = lcm_scalings(s)
    assert c_skip[0] == 1 and c_out[0] == 0
    # LCM's boundary part (timestep scaling 10) is gone by sigma = 0.5: there f is EDM's x0 prediction
    # to within 1 %, while CM's scalings (no timestep scaling) still differ from EDM's by far more.
    e_skip, e_out, e_in, e_noise = get_scalings("edm")(s)
    assert torch.allclose(c_skip[2:], e_skip[2:], rtol=0.02) and torch.allclose(c_out[2:], e_out[2:], rtol=0.01)
    assert torch.equal(c_in, e_in) and torch.equal(c_noise, e_noise)
    # The boundary part is LCM's formula (diffusers' LCMScheduler) at "timestep" t = sigma - sigma_min.
    sched = LCMScheduler()
    for i, sigma in enumerate(s.tolist()):
        b_skip, b_out = sched.get_scalings_for_boundary_condition_discrete(sigma - 0.002)
        assert math.isclose(c_skip[i], b_skip + b_out * e_skip[i], rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(c_out[i], b_out * e_out[i], rel_tol=1e-9, abs_tol=1e-12)


def test_guided_euler_step_is_lcm_augmented_ode_step():
    """LCM sec. 4.2 with a DDIM solver: x + (1 + w) Phi(c) - w Phi(∅) equals one Euler step of D_w."""
    x, labels, w = torch.randn(32, 2, dtype=DT), torch.arange(32) % 4, 3.0
    step = lambda D, c: euler_step(D, x, 1.3, 0.4, c)[0] - x  # noqa: E731
    lcm = x + (1 + w) * step(MIX, labels) - w * step(MIX, None)
    assert torch.allclose(euler_step(CFGDenoiser(MIX, w, 4), x, 1.3, 0.4, labels)[0], lcm, atol=1e-12)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_lcd_with_w_zero_and_k_one_is_cd_of_the_conditional_teacher(solver):
    f, target = _student(0), _student(1)
    x0, labels = MIX.sample_with_classes(128, torch.Generator().manual_seed(3))
    zeros = torch.zeros(128)
    lcd = lcd_loss(f, target, MIX, x0, labels, N=18, k=1, w_min=0.0, w_max=0.0, null_label=4, solver=solver,
                   generator=torch.Generator().manual_seed(9))
    cd = cd_loss(lambda x, s, c: f(x, s, (c, zeros)), lambda x, s, c: target(x, s, (c, zeros)), MIX, x0, N=18,
                 solver=solver, cond=labels, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(lcd, cd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [1, 3])
def test_skipping_step_spans_k_levels(k):
    grid = cm_sigmas(12).float()
    seen = []

    def teacher(x, sigma, cond):
        seen.append(sigma[: x.shape[0] // 2].clone())  # CFG batches (c, ∅): the first half
        return torch.zeros_like(x)

    def f(x, sigma, cond):
        seen.append(sigma.clone())
        return x

    lcd_loss(f, f, teacher, torch.zeros(256, 2), torch.zeros(256, dtype=torch.long), N=12, k=k, null_label=4,
             generator=torch.Generator().manual_seed(0))
    s_teacher, s_student, s_target = seen
    idx_hi = (s_student[:, None] == grid[None]).float().argmax(1)
    idx_lo = (s_target[:, None] == grid[None]).float().argmax(1)
    assert torch.equal(s_teacher, s_student)  # the teacher steps from sigma_{n+k}
    assert torch.equal(idx_hi - idx_lo, torch.full_like(idx_hi, k))
    assert set(idx_lo.tolist()) == set(range(12 - k))  # every n in 0..N-1-k is drawn
    with pytest.raises(ValueError, match="skipping step"):
        lcd_loss(f, f, teacher, torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), N=12, k=12, null_label=4)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_sample_lcm_is_diffusers_lcm_scheduler_step_for_step(steps):
    sched = LCMScheduler(clip_sample=False)
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod.to(DT)
    sched.alphas_cumprod, sched.final_alpha_cumprod = ac, torch.tensor(1.0, dtype=DT)
    ts = [int(t) for t in sched.timesteps]
    sig = torch.tensor([math.sqrt((1 - ac[t]) / ac[t]) for t in ts] + [0.0], dtype=DT)
    eps_model = EpsMLP()

    def f(x, sigma, cond=None):
        """LCM's consistency function of an eps-network, in sigma-space (what LCMScheduler.step computes)."""
        t = ts[int((sig[:-1] - sigma[0]).abs().argmin())]
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
        s = sigma[:, None]
        x_vp = x / (1 + s**2).sqrt()
        eps = eps_model(x_vp, float(t))
        return c_out * (x - s * eps) + c_skip * x_vp  # x0 = x - sigma eps; LCM's c_skip acts on x_vp

    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    theirs, x_vp, g = [], x_T.clone(), torch.Generator().manual_seed(7)
    for t in ts:
        x_vp, _ = sched.step(eps_model(x_vp, float(t)), t, x_vp, generator=g, return_dict=False)
        theirs.append(x_vp)
    ours = []
    sample_lcm(f, x_T * math.sqrt(1 + sig[0].item() ** 2), sig, generator=torch.Generator().manual_seed(7),
               callback=lambda d: ours.append(d["x"] / math.sqrt(1 + d["sigma_next"] ** 2)))
    assert len(ours) == steps
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    assert get_sampler("lcm") is sample_lcm


def test_lcm_trains_from_a_conditional_teacher_and_samples(tmp_path):
    teacher_run = make_run("edm-cfg", "8gaussians-4class", "smoke", steps=20)
    train_run(teacher_run, checkpoint_path=tmp_path / "teacher.pt", progress=False)
    run = make_run("lcm", "8gaussians-4class", "smoke", steps=10)
    model, state = train_run(run, teacher=tmp_path / "teacher.pt", checkpoint_path=tmp_path / "lcm.pt",
                             progress=False)
    assert set(state.emas) == {"target", "ema"}
    labels = torch.arange(40) % 4
    for steps in (1, 4):
        x = sample(model, run, 40, steps=steps, cond=(labels, torch.full((40,), 3.0)), batch_size=16)
        assert x.shape == (40, 2) and torch.isfinite(x).all()
    loaded, loaded_run = load_run(tmp_path / "lcm.pt")
    assert loaded_run == run and loaded.net.guidance_embed
    x1 = sample(loaded, run, 8, cond=(labels[:8], 2.0))
    assert torch.equal(x1, sample(model, run, 8, cond=(labels[:8], 2.0)))


def test_lcm_with_the_exact_teacher_and_refusing_unconditional_teachers():
    run = make_run("lcm", "8gaussians-4class", "smoke", steps=3)
    model, _ = train_run(run, teacher="exact", progress=False)
    assert torch.isfinite(sample(model, run, 8, cond=(torch.arange(8) % 4, 1.0))).all()
    with pytest.raises(ValueError, match="class-conditional"):
        train_run(run, teacher=lambda x, s, c=None: x, progress=False)
