"""Latent consistency fine-tuning (LCF, LCM sec. 4.4; issue 10): consistency training from an LCM checkpoint,
no teacher; its loss, its start, its errors, and a class split (an LCM of 8 classes fine-tuned on the other 2)."""

import pytest
import torch

from fewstep_lab.data.images import CLASSES
from fewstep_lab.losses.lcm import lcd_loss
from fewstep_lab.losses.consistency import data_teacher
from fewstep_lab.methods import get_method
from fewstep_lab.pipeline import load_run, make_domain, make_run, sample, train_run
from fewstep_lab.schedules import DiscreteSchedule, alphas_cumprod
from fewstep_lab.train import TrainContext

torch.set_num_threads(1)
SIGMAS = DiscreteSchedule(alphas_cumprod("linear")).sigmas


@pytest.fixture(scope="module")
def toy_lcm(tmp_path_factory):
    """A ddpm-cfg teacher and its LCM on 8gaussians-4class (smoke): the LCM checkpoint's path."""
    d = tmp_path_factory.mktemp("lcf")
    train_run(make_run("ddpm-cfg", "8gaussians-4class", "smoke", steps=10), checkpoint_path=d / "t.pt", progress=False)
    train_run(make_run("lcm", "8gaussians-4class", "smoke", steps=5, k=20), teacher=d / "t.pt",
              checkpoint_path=d / "lcm.pt", progress=False)
    return d / "lcm.pt"


def test_the_ct_target_is_the_ema_student_one_level_lower_with_the_same_noise():
    seen = []

    def f(x, sigma, cond):
        seen.append((x.clone(), sigma.clone(), cond))
        return x

    x0 = torch.randn(256, 2, dtype=torch.float64)
    labels = torch.arange(256) % 3
    lcd_loss(f, f, data_teacher(x0), x0, labels, k=20, w_min=1.0, w_max=5.0, null_label=None, sigmas=SIGMAS,
             generator=torch.Generator().manual_seed(0))
    (x_hi, s_hi, (y_hi, w_hi)), (x_lo, s_lo, (y_lo, w_lo)) = seen
    z_hi, z_lo = (x_hi - x0) / s_hi[:, None], (x_lo - x0) / s_lo[:, None]
    assert torch.allclose(z_hi, z_lo, atol=1e-9)  # the same noise, one skipping step lower
    t = DiscreteSchedule(alphas_cumprod("linear"))
    assert torch.allclose(t.t_of_sigma(s_hi) - t.t_of_sigma(s_lo), torch.full((256,), 20.0, dtype=torch.float64))
    assert torch.equal(y_hi, labels) and torch.equal(w_hi, w_lo) and 1 <= w_hi.min() and w_hi.max() <= 5


def test_lcf_loss_uses_the_no_label_slot_on_unlabelled_data_and_refuses_unknown_labels(toy_lcm):
    run = make_run("lcf", "8gaussians", "smoke", init=str(toy_lcm))
    run = get_method("lcf").prepare_run(run, make_domain(run))
    assert run.recipe.num_classes == 4 and run.recipe.ddpm_schedule == "linear" and run.recipe.N == 1000
    seen = []
    f = lambda x, s, c: (seen.append(c[0].clone()), x)[1]  # noqa: E731
    loss_fn = get_method("lcf").loss(run.recipe, None)
    ctx = TrainContext(step=0, steps=1, emas={"target": f}, generator=torch.Generator().manual_seed(0),
                       device=torch.device("cpu"))
    assert loss_fn(f, torch.randn(8, 2), ctx).shape == (8,)
    assert all(torch.equal(c, torch.full((8,), 4)) for c in seen)
    with pytest.raises(ValueError, match="4 classes"):
        loss_fn(f, (torch.randn(8, 2), torch.arange(8)), ctx)


def test_lcf_starts_from_the_lcm_trains_and_samples(toy_lcm, tmp_path):
    lcm, lcm_run = load_run(toy_lcm)
    run0 = make_run("lcf", "8gaussians", "smoke", init=str(toy_lcm), steps=0)
    start, _ = train_run(run0, progress=False)
    labels = torch.full((16,), 4)
    for steps in (1, 2):  # zero steps of LCF: the LCM itself
        assert torch.equal(sample(start, lcm_run, 16, steps=steps, cond=(labels, 2.0)),
                           sample(lcm, lcm_run, 16, steps=steps, cond=(labels, 2.0)))
    run = make_run("lcf", "8gaussians", "smoke", init=str(toy_lcm))
    model, state = train_run(run, checkpoint_path=tmp_path / "lcf.pt", progress=False)
    assert state.step == run.recipe.steps and set(state.emas) == {"target", "ema"}
    loaded, loaded_run = load_run(tmp_path / "lcf.pt")
    assert loaded_run.recipe.num_classes == 4 and loaded_run.recipe.ddpm_schedule == "linear"
    x = sample(loaded, loaded_run, 16, steps=2, cond=(labels, 2.0))
    assert x.shape == (16, 2) and torch.isfinite(x).all()
    assert not torch.equal(x, sample(lcm, lcm_run, 16, steps=2, cond=(labels, 2.0)))  # it moved


def test_lcf_errors(toy_lcm, tmp_path):
    t_path = toy_lcm.parent / "t.pt"
    cases = [({}, "--set init=PATH"), ({"init": str(tmp_path / "none.pt")}, "not a file"),
             ({"init": str(t_path)}, "ddpm-cfg model, not an lcm")]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            train_run(make_run("lcf", "8gaussians", "smoke", **overrides), progress=False)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        train_run(make_run("lcf", "8gaussians", "smoke", init=str(tmp_path / "junk.pt")), progress=False)
    with pytest.raises(ValueError, match="another data space"):
        train_run(make_run("lcf", "cifar10", "smoke", init=str(toy_lcm)), progress=False)


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    """A smoke autoencoder and a temporary encoding cache: {'ae': path}."""
    from fewstep_lab import autoencoder as A

    d = tmp_path_factory.mktemp("latent")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEWSTEP_CACHE", str(d / "cache"))
    A.train_autoencoder(A.autoencoder_recipe("smoke", steps=10), checkpoint_path=d / "ae.pt", progress=False)
    A.train_autoencoder(A.autoencoder_recipe("smoke", steps=10, seed=1), checkpoint_path=d / "ae2.pt", progress=False)
    yield {"ae": str(d / "ae.pt"), "ae2": str(d / "ae2.pt")}
    mp.undo()


def test_an_lcm_of_8_classes_fine_tuned_on_the_other_2(latent, tmp_path):
    """The LCM chapter's demonstration in smoke size, on cifar10-latent: LCM on 8 classes, LCF on the other 2."""
    old, new = CLASSES[:8], CLASSES[8:]
    data = dict(autoencoder=latent["ae"])
    train_run(make_run("ddpm-cfg", "cifar10-latent", "smoke", steps=4, classes=old, **data),
              checkpoint_path=tmp_path / "t.pt", progress=False)
    train_run(make_run("lcm", "cifar10-latent", "smoke", steps=3, classes=old, **data), teacher=tmp_path / "t.pt",
              checkpoint_path=tmp_path / "lcm.pt", progress=False)
    run = make_run("lcf", "cifar10-latent", "smoke", steps=3, classes=new, init=str(tmp_path / "lcm.pt"), **data)
    model, state = train_run(run, checkpoint_path=tmp_path / "lcf.pt", progress=False)
    loaded, loaded_run = load_run(tmp_path / "lcf.pt")
    assert loaded_run.recipe.num_classes == 10 and loaded_run.data_recipe.classes == new
    labels = torch.tensor([8, 9, 8, 9])  # the new classes' own label slots (never trained in the LCM)
    for steps in (1, 2, 4):
        x = sample(loaded, loaded_run, 4, steps=steps, cond=(labels, 1.0))  # decoded images
        assert x.shape == (4, 3, 16, 16) and torch.isfinite(x).all() and x.abs().max() <= 1
    # Another autoencoder is another latent space: refused.
    other = make_run("lcf", "cifar10-latent", "smoke", steps=3, classes=new, init=str(tmp_path / "lcm.pt"),
                     autoencoder=latent["ae2"])
    with pytest.raises(ValueError, match="another data space.*autoencoder"):
        train_run(other, progress=False)
