"""The LCM chapter's latent path (issue 10): ddpm-cfg (a class-conditional DDPM teacher, guided DDIM
checked against diffusers), LCD on the DDPM teacher's own discrete grid, the pipeline end to end."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from fewstep_lab.data.labelled import eight_gaussians_4class
from fewstep_lab.guidance import CFGDenoiser, null_label_of
from fewstep_lab.methods import get_method
from fewstep_lab.methods.guided import GuidedEpsDenoiser
from fewstep_lab.pipeline import build_model, load_run, make_run, sample, train_run
from fewstep_lab.precond import DiscreteEpsDenoiser
from fewstep_lab.sampling import sample_euler
from fewstep_lab.schedules import DiscreteSchedule, alphas_cumprod
from fewstep_lab.train import TrainContext
from helpers import DT, EpsMLP

torch.set_num_threads(1)
NULL = 4


class CondEps(torch.nn.Module):
    """A random class-conditional epsilon-network: EpsMLP's output moved and scaled per label (NULL included)."""

    num_classes = NULL

    def __init__(self, seed=0):
        super().__init__()
        self.base = EpsMLP(seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.shift = torch.nn.Parameter(0.5 * torch.randn(NULL + 1, 2, generator=g, dtype=DT))
        self.scale = torch.nn.Parameter(1 + 0.3 * torch.randn(NULL + 1, 1, generator=g, dtype=DT))

    def forward(self, x, t, cond):
        return self.base(x, t) * self.scale[cond] + self.shift[cond]


# ---------------------------------------------------------------- guided DDIM = diffusers' DDIMScheduler


@pytest.mark.parametrize("schedule, n, w", [("linear", 50, 3.0), ("linear", 8, 1.0), ("cosine", 20, 0.0),
                                            ("linear", 4, 7.5)])
def test_guided_ddim_is_diffusers_ddim_with_the_guided_eps_step_for_step(schedule, n, w):
    sched = DDIMScheduler(beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule],
                          clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(n)
    ac = sched.alphas_cumprod.to(DT)
    sched.alphas_cumprod, sched.final_alpha_cumprod = ac, torch.tensor(1.0, dtype=DT)
    eps_model = CondEps()
    D = GuidedEpsDenoiser(eps_model, ac)
    grid = DiscreteSchedule(ac).ddim_sigmas(n)
    labels = torch.arange(64) % NULL
    x_T_vp = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    ours = []
    sample_euler(CFGDenoiser(D, w, null_label_of(D)), x_T_vp * math.sqrt(1 + grid[0].item() ** 2), grid,
                 cond=labels, callback=lambda d: ours.append(d["x"] / math.sqrt(1 + d["sigma_next"] ** 2)))
    assert len(ours) == n
    x_vp, null = x_T_vp.clone(), torch.full_like(labels, NULL)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            e_c, e_u = eps_model(x_vp, t.to(DT), labels), eps_model(x_vp, t.to(DT), null)
            guided = e_u + (1 + w) * (e_c - e_u)  # diffusers' pipelines: guidance_scale = 1 + w
            x_vp = sched.step(guided, t, x_vp, eta=0.0).prev_sample
            err = ((ours[i] - x_vp).abs().max() / x_vp.abs().max()).item()
            assert err < 1e-10, f"step {i} (t={int(t)}): relative error {err:.2e}"
    assert ((x_vp - x_T_vp).abs().max() > 0.1).item()  # the trajectory moved: not vacuous


def test_guided_eps_denoiser_exposes_net_and_null_label():
    eps_model = CondEps()
    D = GuidedEpsDenoiser(eps_model, alphas_cumprod("linear"))
    assert D.net is eps_model and null_label_of(D) == NULL
    assert list(D.state_dict()) == list(DiscreteEpsDenoiser(eps_model, alphas_cumprod("linear")).state_dict())


# ---------------------------------------------------------------- ddpm-cfg: training, label dropout, sampler


def test_ddpm_cfg_drops_labels_at_p_uncond():
    run = make_run("ddpm-cfg", "8gaussians-4class", "smoke", p_uncond=0.3)
    model = build_model(run)
    seen = []
    inner = model.eps_model.forward
    model.eps_model.forward = lambda x, t, cond: (seen.append(cond.clone()), inner(x, t, cond))[1]
    loss_fn = get_method("ddpm-cfg").loss(run.recipe, None)
    x0, labels = torch.randn(4000, 2), torch.arange(4000) % 4
    ctx = TrainContext(step=0, steps=1, emas={}, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    loss = loss_fn(model, (x0, labels), ctx)
    assert loss.shape == (4000,) and torch.isfinite(loss).all()
    (cond,) = seen
    dropped = cond == 4
    assert abs(dropped.float().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)
    assert torch.equal(cond[~dropped], labels[~dropped])  # the others keep their label


def test_ddpm_cfg_trains_and_samples_guided_ddim(tmp_path):
    run = make_run("ddpm-cfg", "8gaussians-4class", "smoke", steps=15)
    method = get_method("ddpm-cfg")
    assert method.sampler(run.recipe) == "euler" and method.default_steps(run.recipe) == 50
    grid = method.sigmas(run.recipe)
    assert torch.equal(grid, DiscreteSchedule(alphas_cumprod("linear")).ddim_sigmas(50))
    model, state = train_run(run, checkpoint_path=tmp_path / "t.pt", progress=False)
    assert state.step == 15 and isinstance(model, GuidedEpsDenoiser)
    labels = torch.arange(24) % 4
    for w in (0.0, 3.0):
        x = sample(CFGDenoiser(model, w, null_label_of(model)), run, 24, steps=8, cond=labels, batch_size=10)
        assert x.shape == (24, 2) and torch.isfinite(x).all()
    loaded, loaded_run = load_run(tmp_path / "t.pt")
    assert loaded_run == run and null_label_of(loaded) == 4
    with pytest.raises(ValueError, match="p_uncond"):
        make_run("ddpm-cfg", "8gaussians-4class", "smoke", p_uncond=1.5)


# ---------------------------------------------------------------- LCM on a DDPM teacher's own grid

from diffusers import LCMScheduler  # noqa: E402

import fewstep_lab.losses.consistency as consistency_losses  # noqa: E402
from fewstep_lab.losses.consistency import cd_loss  # noqa: E402
from fewstep_lab.losses.lcm import lcd_loss  # noqa: E402
from fewstep_lab.methods.lcm import lcm_eps_scalings, lcm_timesteps, teacher_grid  # noqa: E402
from fewstep_lab.nets.mlp import MLP  # noqa: E402
from fewstep_lab.precond import Precond  # noqa: E402

AC = alphas_cumprod("linear")
SCHED = DiscreteSchedule(AC)


def _ddpm_student(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = MLP(hidden=32, depth=2, num_classes=NULL, guidance_embed=True, noise_scale=4 / 1000)
    torch.nn.init.normal_(net.w_mlp[-1].weight)  # a w branch that matters
    return Precond(net, lambda s: lcm_eps_scalings(s, schedule=SCHED)).to(dtype)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_timesteps_are_diffusers_lcm_scheduler_timesteps(steps):
    sched = LCMScheduler()  # 1000 train timesteps, original_inference_steps = 50: LCM's k = 20
    sched.set_timesteps(steps)
    assert lcm_timesteps(steps, 1000, 50).tolist() == sched.timesteps.tolist()
    with pytest.raises(ValueError, match="steps"):
        lcm_timesteps(51, 1000, 50)


def test_lcm_eps_scalings_are_lcm_boundary_scalings_and_f_at_sigma_min_is_x():
    sched = LCMScheduler()
    for t in (0, 1, 19, 259, 999):
        sigma = SCHED.sigmas[t : t + 1]
        c_skip, c_out, c_in, c_noise = lcm_eps_scalings(sigma, schedule=SCHED)
        b_skip, b_out = sched.get_scalings_for_boundary_condition_discrete(t)
        assert math.isclose(c_skip.item(), b_skip + b_out, rel_tol=1e-9, abs_tol=1e-15)
        assert math.isclose(c_out.item(), -b_out * sigma.item(), rel_tol=1e-9, abs_tol=1e-15)
        assert c_noise.item() == t and math.isclose(c_in.item(), math.sqrt(AC[t].item()), rel_tol=1e-12)
    for dtype in (torch.float32, torch.float64):
        f = _ddpm_student(dtype=dtype)
        x = torch.randn(16, 2, dtype=dtype)
        cond = (torch.arange(16) % (NULL + 1), torch.linspace(0, 7, 16, dtype=dtype))
        assert torch.equal(f(x, SCHED.sigma_min, cond), x)  # boundary condition, exactly
        assert not torch.allclose(f(x, SCHED.sigmas[1].item(), cond), x)  # and only there


def test_lcd_on_the_ddpm_grid_with_k1_w0_is_cd_on_that_grid(monkeypatch):
    f, target = _ddpm_student(0, DT), _ddpm_student(1, DT)
    teacher = GuidedEpsDenoiser(CondEps(), AC)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=DT)
    labels, zeros = torch.arange(64) % NULL, torch.zeros(64, dtype=DT)
    lcd = lcd_loss(f, target, teacher, x0, labels, k=1, w_min=0.0, w_max=0.0, null_label=NULL, sigmas=SCHED.sigmas,
                   generator=torch.Generator().manual_seed(9))
    # cd_loss draws on cm_sigmas(N, ...): hand it the DDPM grid instead.
    monkeypatch.setattr(consistency_losses, "cm_sigmas", lambda N, *a, **k: SCHED.sigmas)
    cd = cd_loss(lambda x, s, c: f(x, s, (c, zeros)), lambda x, s, c: target(x, s, (c, zeros)), teacher, x0, N=1000,
                 solver="euler", cond=labels, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(lcd, cd, rtol=1e-10, atol=1e-14) and (cd > 0).all()
    with pytest.raises(ValueError, match="omit N"):
        lcd_loss(f, target, teacher, x0, labels, N=18, null_label=NULL, sigmas=SCHED.sigmas)


def test_lcd_on_the_ddpm_grid_steps_k_timesteps():
    seen = []

    def f(x, sigma, cond):
        seen.append(sigma.clone())
        return x

    teacher = GuidedEpsDenoiser(CondEps(), AC)
    lcd_loss(f, f, teacher, torch.zeros(512, 2, dtype=DT), torch.zeros(512, dtype=torch.long), k=20, null_label=NULL,
             sigmas=SCHED.sigmas, generator=torch.Generator().manual_seed(0))
    t_hi, t_lo = (SCHED.t_of_sigma(s) for s in seen)
    assert torch.allclose(t_hi - t_lo, torch.full_like(t_hi, 20.0), atol=1e-6)
    assert t_lo.min() >= 0 and t_hi.max() <= 999 and t_lo.round().unique().numel() > 300


def test_lcm_from_a_ddpm_cfg_teacher_takes_its_grid_and_starts_as_the_teacher(tmp_path):
    t_run = make_run("ddpm-cfg", "8gaussians-4class", "smoke", steps=10)
    train_run(t_run, checkpoint_path=tmp_path / "t.pt", progress=False)
    teacher, _ = load_run(tmp_path / "t.pt")
    run = make_run("lcm", "8gaussians-4class", "smoke", steps=0, k=20)
    model, state = train_run(run, teacher=teacher, progress=False)
    recipe = get_method("lcm").prepare(run.recipe, teacher)
    assert recipe.ddpm_schedule == "linear" and recipe.N == 1000
    assert recipe.sigma_min == SCHED.sigma_min and recipe.sigma_max == SCHED.sigma_max
    assert torch.equal(teacher_grid(recipe), SCHED.sigmas)
    # Student = teacher's conditional x0 with LCM's boundary scalings, for any w (zero w branch).
    x, labels = torch.randn(32, 2), torch.arange(32) % 5
    for t in (0, 19, 500, 999):
        sigma = SCHED.sigmas[t].item()
        b_skip, b_out = LCMScheduler().get_scalings_for_boundary_condition_discrete(t)
        want = b_skip * x + b_out * teacher(x, sigma, labels)
        got = model(x, sigma, (labels, 3.0))
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), t
    # Multistep grid: LCMScheduler's timesteps on the teacher's schedule.
    grid = get_method("lcm").sigmas(recipe, 4)
    assert torch.equal(grid, SCHED.sigmas_for_timesteps(torch.tensor([999, 759, 499, 259])))
    with pytest.raises(ValueError, match="ddpm_schedule"):
        get_method("lcm").prepare(recipe, eight_gaussians_4class().denoiser)  # not a DDPM teacher


def test_lcm_distils_a_ddpm_cfg_checkpoint_end_to_end(tmp_path):
    train_run(make_run("ddpm-cfg", "8gaussians-4class", "smoke", steps=10), checkpoint_path=tmp_path / "t.pt",
              progress=False)
    run = make_run("lcm", "8gaussians-4class", "smoke", steps=6, k=20)
    model, state = train_run(run, teacher=tmp_path / "t.pt", checkpoint_path=tmp_path / "lcm.pt", progress=False)
    loaded, loaded_run = load_run(tmp_path / "lcm.pt")
    assert loaded_run.recipe.ddpm_schedule == "linear" and loaded_run.recipe.N == 1000
    labels = torch.arange(12) % 4
    for steps in (1, 2, 4):
        x = sample(loaded, loaded_run, 12, steps=steps, cond=(labels, 2.0))
        assert x.shape == (12, 2) and torch.isfinite(x).all()
    assert torch.equal(sample(loaded, loaded_run, 12, steps=2, cond=(labels, 2.0)),
                       sample(model, loaded_run, 12, steps=2, cond=(labels, 2.0)))


# ---------------------------------------------------------------- cifar10-latent end to end


def test_fewstep_train_ddpm_cfg_then_lcm_on_cifar10_latent(tmp_path, monkeypatch):
    from fewstep_lab import autoencoder as A
    from fewstep_lab.cli import main
    from fewstep_lab.pipeline import default_sigmas, make_domain

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    A.train_autoencoder(A.autoencoder_recipe("smoke", steps=10), checkpoint_path=tmp_path / "ae.pt", progress=False)
    common = ["--data", "cifar10-latent", "--profile", "smoke", "--set", f"autoencoder={tmp_path / 'ae.pt'}"]
    assert main(["train", "--method", "ddpm-cfg", *common, "--out", str(tmp_path / "t.pt")]) == 0
    assert main(["train", "--method", "lcm", *common, "--teacher", str(tmp_path / "t.pt"),
                 "--out", str(tmp_path / "lcm.pt")]) == 0
    teacher, t_run = load_run(tmp_path / "t.pt")
    lcm, run = load_run(tmp_path / "lcm.pt")
    assert run.recipe.ddpm_schedule == "linear" and run.recipe.k == 20 and lcm.net.guidance_embed
    domain = make_domain(run)
    labels = torch.arange(20) % 10
    # Guided DDIM of the teacher and 2-step LCM, both scored by FD of decoded images and the classifier's accuracy.
    # (domain.evaluate until pipeline.evaluate takes cond)
    r_t = domain.evaluate(CFGDenoiser(teacher, 3.0, 10), "euler", default_sigmas(t_run, 4), n=20, cond=labels)
    r_l = domain.evaluate(lcm, "lcm", default_sigmas(run, 2), n=20, cond=(labels, 3.0))
    for r, nfe in ((r_t, 4), (r_l, 2)):
        assert r.nfe == nfe and math.isfinite(r.fd_mean) and 0 <= r.accuracy <= 1
