"""The LCM chapter's latent path (issue 10): ddpm-cfg (a class-conditional DDPM teacher, guided DDIM
checked against diffusers), LCD on the DDPM teacher's own discrete grid, the pipeline end to end."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

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
