"""The methods x data pipeline: every registered (method, data) pair trains, samples and evaluates through one
code path; a method registered from outside the package runs end to end; recipes and run descriptions
validate; checkpoints of other runs and of older versions are refused with a message that says what to do."""

import json
import math
import socket
import threading
from dataclasses import dataclass, replace

import pytest
import torch

from fewstep_lab import pipeline as P
from fewstep_lab.cli import main
from fewstep_lab.io import LockedError
from fewstep_lab.losses.denoising import _per_sample
from fewstep_lab.methods import METHODS, Method, get_method, register, sampler_nfe, unregister
from fewstep_lab.precond import Precond, get_scalings
from fewstep_lab.recipes import NoiseRecipe, recipe_from_fields
from fewstep_lab.sampling import get_sampler
from fewstep_lab.train import save_checkpoint, train


pytestmark = pytest.mark.usefixtures("one_thread")


BUILTIN = ("edm", "ddpm", "cd", "ct", "ict", "pd")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A few-step EDM teacher per data domain, for the distillation methods."""
    out = tmp_path_factory.mktemp("teachers")

    def teacher(data):
        path = out / f"{data}.pt"
        if not path.is_file():
            P.train_run(P.make_run("edm", data, "smoke", steps=3), checkpoint_path=path, progress=False)
        return str(path)
    return teacher


@pytest.mark.parametrize("data", ["8gaussians", "cifar10"])
@pytest.mark.parametrize("method", BUILTIN)
def test_every_pair_trains_samples_and_evaluates(method, data, teachers, tmp_path):
    run = P.make_run(method, data, "smoke", steps=2)
    m = get_method(method)
    teacher = teachers(data) if m.teacher == "denoiser" else None
    model, state = P.train_run(run, teacher=teacher, checkpoint_path=tmp_path / "m.pt", progress=False)
    assert state.step == 2 and all(math.isfinite(v) for _, v in state.losses)
    loaded, stored = P.load_run(tmp_path / "m.pt")
    assert stored.method == method and stored.data == run.data
    steps = 2 if method == "ddpm" else None  # DDPM's default is all 1000 timesteps
    x = P.sample(loaded, stored, 6, steps=steps, seed=1)
    assert x.shape[0] == 6 and torch.isfinite(x).all()
    res = P.evaluate(loaded, stored, steps=steps, n=8, seeds=(0,))
    value = res.swd_mean if data == "8gaussians" else res.fd_mean
    assert math.isfinite(value) and value > 0
    assert res.nfe == m.nfe(stored.recipe, P.default_sigmas(stored, steps))  # counted calls = the method's NFE


def test_counted_nfe_matches_each_sampler():
    from fewstep_lab.data.toy2d import get_dataset

    D, calls = get_dataset("8gaussians").denoiser, [0]

    def counted(x, sigma, cond=None):
        calls[0] += 1
        return D(x, sigma, cond)

    grid = P.default_sigmas(P.make_run("edm", "8gaussians", "smoke"), 5)
    for name in ("euler", "heun", "ancestral", "dpm_solver_2", "dpmpp_2m", "euler_maruyama", "consistency"):
        calls[0] = 0
        get_sampler(name)(counted, grid[0] * torch.randn(4, 2), grid, generator=torch.Generator().manual_seed(0))
        assert calls[0] == sampler_nfe(name, grid), name


# ---------------------------------------------------------------- a method from outside the package


@dataclass(frozen=True)
class DenoiseOnceRecipe(NoiseRecipe):
    """Test-only: regress the teacher's x0 at sigma_max, sample with one Euler step."""


class DenoiseOnce(Method):
    name, title, recipe_cls, teacher = "denoise-once", "denoise once", DenoiseOnceRecipe, "denoiser"
    profiles = {"toy2d": {"smoke": dict(steps=30, lr=3e-3)}}

    def build(self, recipe, net):
        return Precond(net, get_scalings("edm", sigma_data=recipe.sigma_data))

    def loss(self, recipe, teacher):
        def loss_fn(model, x0, ctx):
            x = x0 + recipe.sigma_max * torch.randn(x0.shape, generator=ctx.generator)
            with torch.no_grad():
                target = teacher(x, recipe.sigma_max)
            return _per_sample((model(x, recipe.sigma_max) - target) ** 2)
        return loss_fn

    def sampler(self, recipe):
        return "euler"

    def sigmas(self, recipe, steps=None):
        return torch.tensor([recipe.sigma_max, 0.0], dtype=torch.float64)


@pytest.fixture
def denoise_once():
    method = register(DenoiseOnce())
    yield method
    unregister(method.name)
    assert "denoise-once" not in METHODS


def test_a_method_registered_outside_the_package_runs_end_to_end(denoise_once, tmp_path, capsys):
    ckpt = tmp_path / "once.pt"
    assert main(["train", "--method", "denoise-once", "--data", "8gaussians", "--teacher", "exact",
                 "--profile", "smoke", "--quiet", "--device", "cpu", "--out", str(ckpt)]) == 0
    assert "trained denoise-once on 8gaussians" in capsys.readouterr().out
    model, run = P.load_run(ckpt)
    assert run.method == "denoise-once" and isinstance(run.recipe, DenoiseOnceRecipe) and run.recipe.steps == 30
    assert main(["eval", "--ckpt", str(ckpt), "--n", "500", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "euler steps    1  NFE      1" in out and "noise floor" in out
    # One Euler step from sigma_max to 0 returns the model's x0 estimate: close to the data mean.
    x = P.sample(model, run, 2000)
    assert x.mean(0).abs().max() < 0.2
    with pytest.raises(ValueError, match="registered already"):
        register(DenoiseOnce())


# ---------------------------------------------------------------- recipes and run descriptions


def test_profile_numbers_come_from_one_table_per_method():
    cd_toy, cd_img = P.make_run("cd", "8gaussians", "cpu"), P.make_run("cd", "cifar10", "cpu")
    assert type(cd_toy.recipe) is type(cd_img.recipe)  # one CD recipe whatever the data
    assert (cd_toy.recipe.steps, cd_toy.recipe.batch_size, cd_toy.recipe.ema_decay) == (1500, 1024, 0.99)
    assert (cd_img.recipe.steps, cd_img.recipe.batch_size, cd_img.recipe.ema_halflife_kimg) == (300, 32, 5.0)
    assert cd_toy.recipe.multistep_sigma_min == 0.25 and cd_img.recipe.multistep_sigma_min == 0.8
    assert P.make_run("ct", "checkerboard", "cpu").recipe.mu0 == 0.01 and P.make_run("ct", "cifar10").recipe.mu0 == 0.9
    run = P.make_run("edm", "8gaussians", "cpu", steps=5, hidden=64)
    assert run.recipe.steps == 5 and run.data_recipe.hidden == 64 and run.data == "toy2d"


@pytest.mark.parametrize("field, value, match", [
    ("lr", float("nan"), "lr must be a finite"), ("lr", -1.0, "lr must be > 0"), ("sigma_data", 0.0, "sigma_data"),
    ("sigma_min", 100.0, "sigma_min must be < sigma_max"), ("steps", -3, "steps"), ("ema_decay", 1.5, "ema_decay"),
    ("distance", "lpipz", "unknown distance"), ("mu0", 1.0, "mu0"),
])
def test_recipes_refuse_bad_values(field, value, match):
    run = P.make_run("ct", "8gaussians", "smoke")
    with pytest.raises(ValueError, match=match):
        replace(run.recipe, **{field: value})


def test_run_descriptions_are_validated_when_loaded(tmp_path):
    run = P.make_run("cd", "8gaussians", "smoke")
    d = run.to_dict()
    assert P.run_from_dict(json.loads(json.dumps(d))) == run  # JSON round trip
    bad_type = {**d, "recipe": {**d["recipe"], "N": "eighteen"}}
    bad_value = {**d, "recipe": {**d["recipe"], "sigma_data": float("nan")}}
    for bad, match in ((bad_type, "CDRecipe.N must be"), (bad_value, "sigma_data must be a finite"),
                       ({**d, "method": "gan"}, "unknown method"), ({**d, "data_recipe": {"hidden": 3.5}}, "hidden"),
                       ({"class": "CDRecipe", "steps": 3}, "older fewstep_lab")):
        with pytest.raises(ValueError, match=match):
            P.run_from_dict(bad)
    with pytest.raises(ValueError, match="unknown CDRecipe fields"):
        recipe_from_fields(type(run.recipe), {"stepz": 3})


def test_checkpoints_of_the_previous_version_say_retrain(tmp_path):
    # What the code before the methods x data restructuring wrote: a recipe with a class name.
    model = P.build_model(P.make_run("edm", "8gaussians", "smoke"))
    state = train(model, lambda m, x, ctx: (m(x, 1.0) - x).pow(2).mean(1), lambda g: torch.randn(4, 2, generator=g),
                  steps=1, device="cpu", progress=False)
    old = tmp_path / "old.pt"
    save_checkpoint(old, state, {"recipe": {"class": "ToyRecipe", "method": "edm", "dataset": "8gaussians"}})
    with pytest.raises(ValueError, match="older fewstep_lab.*retrain"):
        P.load_run(old)
    with pytest.raises(P.RunMismatchError, match="--restart"):
        P.train_run(P.make_run("edm", "8gaussians", "smoke", steps=1), checkpoint_path=old, progress=False)


def test_resume_continues_and_steps_may_grow(tmp_path):
    path = tmp_path / "ict.pt"
    P.train_run(P.make_run("ict", "8gaussians", "smoke", steps=3), checkpoint_path=path, progress=False)
    _, state = P.train_run(P.make_run("ict", "8gaussians", "smoke", steps=5), checkpoint_path=path, progress=False)
    assert state.step == 5 and P.load_run(path)[1].recipe.steps == 5
    with pytest.raises(P.RunMismatchError, match="different run"):
        P.train_run(P.make_run("ict", "8gaussians", "smoke", steps=5, seed=1), checkpoint_path=path, progress=False)


def test_teacher_rules():
    with pytest.raises(ValueError, match="distils a teacher"):
        P.train_run(P.make_run("pd", "8gaussians", "smoke"), progress=False)
    with pytest.raises(ValueError, match="without a teacher"):
        P.train_run(P.make_run("ict", "8gaussians", "smoke"), teacher="exact", progress=False)
    with pytest.raises(ValueError, match="closed-form denoiser; toy2d .pinwheel. has none"):
        P.train_run(P.make_run("cd", "pinwheel", "smoke"), teacher="exact", progress=False)
    with pytest.raises(ValueError, match="unknown data"):
        P.make_run("cd", "mnist")


def test_a_finished_image_run_is_loaded_not_retrained(tmp_path):
    # Image recipes hold tuples (channel_mult, attn_resolutions) that a checkpoint's JSON stores as lists:
    # load_or_train must still recognise its own run and load it (not train it afresh).
    run = P.make_run("edm", "cifar10", "smoke", steps=2)
    path = tmp_path / "edm.pt"
    _, first = P.load_or_train(run, path, device="cpu", progress=False)
    stamp = path.stat().st_mtime_ns
    _, again = P.load_or_train(run, path, device="cpu", progress=False)
    assert path.stat().st_mtime_ns == stamp and again.step == first.step == 2


def test_load_or_train_waits_for_another_process_training_the_same_file(tmp_path):
    # Two notebooks side by side (pytest -n 2) share a checkpoint: the second waits for the first, then loads.
    import subprocess
    import sys
    import time

    from fewstep_lab.io import FileLock

    run = P.make_run("edm", "8gaussians", "smoke", steps=3)
    path = tmp_path / "shared.pt"
    lock = FileLock(path, purpose="training into")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.path.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": time.time()}))
        with pytest.raises(LockedError):
            P.load_or_train(run, path, progress=False, wait_s=0.0)

        def release():
            time.sleep(1.5)
            lock.path.unlink()
        threading.Thread(target=release).start()
        _, state = P.load_or_train(run, path, progress=False, wait_s=30.0)
        assert state.step == 3 and path.is_file()
    finally:
        holder.kill()


def test_train_run_refuses_a_locked_checkpoint_unless_asked_to_wait(tmp_path):
    import time

    from fewstep_lab.io import FileLock

    run, path = P.make_run("edm", "8gaussians", "smoke", steps=2), tmp_path / "x.pt"
    lock = FileLock(path)
    lock.path.write_text(json.dumps({"pid": 1, "host": socket.gethostname(),
                                     "started": time.time()}))
    assert _pid_is_alive(1)  # pid 1 runs on every Linux host: the lock is live
    with pytest.raises(LockedError):
        P.train_run(run, checkpoint_path=path, progress=False)

    def release():
        time.sleep(1.0)
        lock.path.unlink()
    threading.Thread(target=release).start()
    _, state = P.train_run(run, checkpoint_path=path, progress=False, restart=True, wait_s=30)
    assert state.step == 2


def _pid_is_alive(pid):
    from fewstep_lab.io import _pid_alive
    return _pid_alive(pid)
