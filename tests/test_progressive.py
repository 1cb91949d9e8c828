"""Progressive distillation (Salimans & Ho 2022) in sigma-space: grids, the closed-form target,
the truncated-SNR weight, the exact 2-step student of a Gaussian teacher, and the halving rounds."""


import pytest
import torch

from fewstep_lab.methods import get_method
from fewstep_lab.pipeline import default_sigmas, load_run, make_run, train_run
from fewstep_lab.data.toy2d import gaussian, get_dataset
from fewstep_lab.losses.progressive import (pd_loss, pd_sigmas, pd_target, progressive_distillation_rounds,
                                            truncated_snr_weight)
from fewstep_lab.sampling import euler_step, sample_euler
from helpers import DT

torch.set_num_threads(1)
MU, S = torch.tensor([0.3, -0.2], dtype=DT), 0.5


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def euler_factor(sigma, sigma_next, s=S):
    """One Euler step with the exact Gaussian denoiser scales x - mu by this factor."""
    return 1 + (sigma_next - sigma) * sigma / (s**2 + sigma**2)


def exact_student(student_grid, s=S):
    """The denoiser whose ONE Euler step on student_grid equals the Gaussian teacher's TWO on the doubled grid."""
    teacher_grid = pd_sigmas(2 * (len(student_grid) - 1))

    def D(x, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=DT).expand(x.shape[0])
        i = torch.searchsorted(-student_grid, -sigma)  # position of sigma on the decreasing grid
        assert torch.equal(student_grid[i], sigma)
        t, m, s_ = teacher_grid[2 * i], teacher_grid[2 * i + 1], teacher_grid[2 * i + 2]
        r = s_ / t
        gain = (euler_factor(t, m, s) * euler_factor(m, s_, s) - r) / (1 - r)
        return MU + (x - MU) * gain[:, None]
    return D


def test_pd_sigmas_halve_exactly():
    for N in (1, 2, 8, 64):
        g = pd_sigmas(N)
        assert len(g) == N + 1 and g[0] == 80.0 and g[-1] == 0 and (g[1:] < g[:-1]).all()
        assert torch.equal(pd_sigmas(2 * N)[::2], g)
    assert pd_sigmas(1).tolist() == [80.0, 0.0]
    assert pd_sigmas(64)[-2].item() == pytest.approx((0.002 ** (1 / 7) + (80 ** (1 / 7) - 0.002 ** (1 / 7)) / 64) ** 7)
    with pytest.raises(ValueError, match="integer >= 1"):
        pd_sigmas(0)


@pytest.mark.parametrize("sigma_s", [0.7, 0.0])
def test_pd_target_is_what_one_euler_step_needs(sigma_s):
    x_t = torch.randn(64, 3, 4, generator=gen(1), dtype=DT)
    x_s = torch.randn(64, 3, 4, generator=gen(2), dtype=DT)
    sigma_t, sigma_s = torch.full((64,), 2.5, dtype=DT), torch.full((64,), sigma_s, dtype=DT)
    target = pd_target(x_t, x_s, sigma_t, sigma_s)
    stepped, _ = euler_step(lambda x, s, c=None: target, x_t, sigma_t, sigma_s)
    assert torch.allclose(stepped, x_s, rtol=0, atol=1e-12)
    if sigma_s[0] == 0:
        assert torch.equal(target, x_s)


def test_truncated_snr_is_max_of_x0_and_eps_errors():
    sigma = torch.tensor([0.01, 0.5, 1.0, 3.0, 80.0], dtype=DT)
    assert torch.allclose(truncated_snr_weight(sigma), torch.tensor([1e4, 4.0, 1.0, 1.0, 1.0], dtype=DT))
    x0 = torch.randn(5, 2, generator=gen(3), dtype=DT)
    x0_hat = x0 + torch.randn(5, 2, generator=gen(4), dtype=DT)
    x = x0 + sigma[:, None] * torch.randn(5, 2, generator=gen(5), dtype=DT)
    eps, eps_hat = (x - x0) / sigma[:, None], (x - x0_hat) / sigma[:, None]
    err_x0, err_eps = ((x0 - x0_hat) ** 2).sum(1), ((eps - eps_hat) ** 2).sum(1)
    assert torch.allclose(truncated_snr_weight(sigma) * err_x0, torch.maximum(err_x0, err_eps))


def test_exact_two_step_student_has_zero_loss():
    data = gaussian(tuple(MU.tolist()), S)
    x0 = data.sample(4096, gen(6)).to(DT)
    teacher_grid = pd_sigmas(16)
    student = exact_student(teacher_grid[::2])
    loss = pd_loss(student, data.denoiser, x0, sigmas=teacher_grid, generator=gen(7))
    assert loss.shape == (4096,) and loss.max() < 1e-20
    wrong = exact_student(teacher_grid[::2], s=1.1 * S)  # the 2-step map of the wrong data std
    assert pd_loss(wrong, data.denoiser, x0, sigmas=teacher_grid, generator=gen(7)).mean() > 1e-4
    uniform = pd_loss(wrong, data.denoiser, x0, sigmas=teacher_grid, generator=gen(7), weighting="uniform")
    weighted = pd_loss(wrong, data.denoiser, x0, sigmas=teacher_grid, generator=gen(7))
    assert (weighted >= uniform).all() and (weighted > uniform).any()
    # and sampled with Euler on its own grid it reproduces the teacher's twice-as-long Euler chain
    x_T = 80 * torch.randn(256, 2, generator=gen(8), dtype=DT)
    assert torch.allclose(sample_euler(student, x_T, teacher_grid[::2]),
                          sample_euler(data.denoiser, x_T, teacher_grid), rtol=0, atol=1e-10)


def test_pd_loss_rejects_bad_grids():
    x0 = torch.zeros(4, 2)
    D = gaussian().denoiser
    with pytest.raises(ValueError, match="even number of steps"):
        pd_loss(D, D, x0, sigmas=pd_sigmas(3))
    with pytest.raises(ValueError, match="unknown weighting"):
        pd_loss(D, D, x0, sigmas=pd_sigmas(4), weighting="snr")


def test_rounds_halve_the_step_count_and_start_from_the_teacher():
    seen, made_from = [], []

    def make_student(teacher):
        made_from.append(teacher)
        return f"student of {teacher}"

    def train_round(student, teacher, sigmas):
        seen.append(len(sigmas) - 1)
        return f"{len(sigmas) // 2}-step"

    students = progressive_distillation_rounds("teacher", train_round, make_student=make_student,
                                               teacher_steps=16, student_steps=1)
    assert seen == [16, 8, 4, 2] and list(students) == [8, 4, 2, 1]
    assert made_from == ["teacher", "8-step", "4-step", "2-step"] and students[1] == "1-step"
    with pytest.raises(ValueError, match="power of two"):
        progressive_distillation_rounds("t", train_round, teacher_steps=12, student_steps=1)


def test_smoke_pd_rounds_from_the_exact_teacher(tmp_path):
    run = make_run("pd", "8gaussians", "smoke", steps=15, teacher_steps=4)
    exact = get_dataset("8gaussians").denoiser
    final, state = train_run(run, teacher=exact, progress=False, checkpoint_path=tmp_path / "pd.pt")
    assert state.step == 15
    assert (tmp_path / "pd.pt").is_file() and (tmp_path / "pd.2steps.pt").is_file()
    pd = get_method("pd")
    assert pd.checkpoint_for(tmp_path / "pd.pt", run.recipe, 2) == tmp_path / "pd.2steps.pt"
    assert pd.checkpoint_for(tmp_path / "pd.pt", run.recipe, 1) == tmp_path / "pd.pt"
    model, r = load_run(tmp_path / "pd.2steps.pt")
    assert r.recipe.student_steps == 2 and pd.sampler(r.recipe) == "euler" and pd.default_steps(r.recipe) == 2
    assert r.recipe.init_from_teacher is False  # the exact denoiser has no weights to start from
    for student, rr in ((final, run), (model, r)):
        grid = default_sigmas(rr)
        out = sample_euler(student, grid[0] * torch.randn(300, 2, generator=gen(9)), grid)
        assert torch.isfinite(out).all() and len(grid) - 1 == rr.recipe.student_steps
    # the second round's student starts from the first round's weights (0 training steps: equal)
    x = torch.randn(5, 2)
    train_run(make_run("pd", "8gaussians", "smoke", steps=0, teacher_steps=4), teacher=exact, progress=False,
              checkpoint_path=tmp_path / "zero.pt")
    one, two = load_run(tmp_path / "zero.pt")[0], load_run(tmp_path / "zero.2steps.pt")[0]
    assert torch.equal(one(x, 1.0), two(x, 1.0))
