"""CIFAR-10 glue (fewstep_lab/cifar.py): recipes, data, smoke training of teacher/CD/iCT, checkpoints,
channels_last + bf16 on CPU, sampling grids and the FD plumbing."""

from dataclasses import replace

import pytest
import torch

from fewstep_lab import cifar as C
from fewstep_lab.data.images import REPO_ROOT
from fewstep_lab.nets.classifier import CifarClassifier
from fewstep_lab.nets.unet import unet_sizes

SHARED = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared CIFAR-10 copy at {SHARED}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These steps are tiny: on a shared 2-core machine a second thread costs more than it gains.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images():
    return C.load_images(C.cifar_recipe("edm", "smoke"))


def _finite_losses(state):
    return state.losses and all(torch.isfinite(torch.tensor(v)) for _, v in state.losses)


def test_recipes_per_profile():
    smoke, cpu, gpu = (C.cifar_recipe("edm", p) for p in ("smoke", "cpu", "gpu"))
    assert smoke.resolution == cpu.resolution == 16 and gpu.resolution == 32 and gpu.classes is None
    assert gpu.bf16 and gpu.channels_last and not cpu.bf16
    assert {k: getattr(gpu, k) for k in unet_sizes["gpu"]} == unet_sizes["gpu"]
    assert isinstance(C.cifar_recipe("ict", "gpu"), C.CifarICTRecipe) and C.cifar_recipe("ict", "gpu").dropout == 0.3
    assert C.cifar_recipe("cd", "cpu", steps=7).steps == 7
    with pytest.raises(ValueError, match="unknown CIFAR-10 method"):
        C.cifar_recipe("gan", "smoke")
    with pytest.raises(ValueError, match="unknown recipe fields"):
        C.cifar_recipe("edm", "smoke", stepz=3)
    with pytest.raises(ValueError, match="resolution"):
        replace(smoke, resolution=8)
    with pytest.raises(ValueError, match="classes"):
        replace(smoke, classes=("dragon",))


@needs_shared
def test_load_images_selects_classes_and_pools(images):
    from fewstep_lab.data.images import load_cifar10

    recipe = C.cifar_recipe("edm", "smoke")
    assert images.shape == (recipe.train_images, 3, 16, 16) and images.dtype == torch.uint8
    full, labels = load_cifar10(None, "train", limit=400)
    first = full[labels == 1][:recipe.train_images]  # 'automobile' is class 1
    pooled = torch.nn.functional.avg_pool2d(first.float(), 2).round()
    assert torch.equal(images.float(), pooled)


@needs_shared
def test_teacher_cd_ict_smoke_steps_give_finite_losses(images, tmp_path):
    r = replace(C.cifar_recipe("edm", "smoke"), steps=3)
    D, st = C.train_cifar_teacher(r, images=images, checkpoint_path=tmp_path / "edm.pt", progress=False)
    assert st.step == 3 and _finite_losses(st)
    # CD starts from the teacher's weights (CM sec. 6): with 0 steps the student's net IS the teacher's.
    f0, _ = C.train_cifar_cd(D, replace(C.cifar_recipe("cd", "smoke"), steps=0), images=images, progress=False)
    for a, b in zip(f0.net.parameters(), D.net.parameters()):
        assert torch.equal(a, b)
    f, st = C.train_cifar_cd(tmp_path / "edm.pt", replace(C.cifar_recipe("cd", "smoke"), steps=2), images=images,
                             progress=False)
    assert st.step == 2 and _finite_losses(st) and "target" in st.emas
    g, st = C.train_cifar_ct(replace(C.cifar_recipe("ict", "smoke"), steps=2), images=images, progress=False)
    assert st.step == 2 and _finite_losses(st) and set(st.emas) == {"ema"}  # iCT: no EMA target
    # Consistency models obey the boundary condition f(x, sigma_min) = x exactly.
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(g(x, 0.002), x) and torch.equal(f(x, 0.002), x)
    with pytest.raises(ValueError, match="same data"):
        C.train_cifar_cd(tmp_path / "edm.pt", replace(C.cifar_recipe("cd", "smoke"), classes=("cat",)), progress=False)
    with pytest.raises(TypeError, match="CifarCDRecipe"):
        C.train_cifar_cd(D, r)


@needs_shared
def test_checkpoint_round_trip(images, tmp_path):
    r = replace(C.cifar_recipe("ict", "smoke"), steps=2)
    f, _ = C.train_cifar_ct(r, images=images, checkpoint_path=tmp_path / "ict.pt", progress=False)
    g, recipe = C.load_cifar(tmp_path / "ict.pt")
    assert recipe == r
    for a, b in zip(f.state_dict().values(), g.state_dict().values()):
        assert torch.equal(a, b)
    x1, x2 = (C.sample_images(m, r, 5, steps=2, seed=3) for m in (f, g))
    assert torch.equal(x1, x2) and x1.shape == (5, 3, 16, 16) and x1.abs().max() <= 1


@needs_shared
def test_channels_last_and_bf16_autocast_run_on_cpu(images):
    r = replace(C.cifar_recipe("edm", "smoke"), steps=2, bf16=True, channels_last=True)
    conv = C.build_image_model(r).net.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    seen = []

    def watch(state):  # after step 1: record what the first convolution sees and returns in step 2
        state.model.net.conv_in.register_forward_hook(
            lambda m, args, out: seen.append((args[0].is_contiguous(memory_format=torch.channels_last), out.dtype)))

    D, st = C.train_cifar_teacher(r, images=images, progress=False, device="cpu", hooks=[(1, watch)])
    assert _finite_losses(st)
    assert seen and all(cl and dtype == torch.bfloat16 for cl, dtype in seen)
    # Outside autocast the model computes in float32 and returns x's dtype.
    assert D(torch.randn(2, 3, 16, 16), 1.0).dtype == torch.float32


def test_sampling_grids_and_nfe():
    edm, cm = C.cifar_recipe("edm", "smoke"), C.cifar_recipe("cd", "smoke")
    assert C.nfe(edm, C.sampling_sigmas(edm)) == 35  # EDM's 18 Heun steps
    assert C.sampling_sigmas(cm, 1).tolist() == [80.0, 0.0]
    assert C.sampling_sigmas(cm, 2).tolist() == pytest.approx([80.0, C.TWO_STEP_SIGMA, 0.0])
    assert C.nfe(cm, C.sampling_sigmas(cm, 2)) == 2
    grid = C.image_grid(torch.zeros(10, 3, 4, 4), nrow=4, pad=1)
    assert grid.shape == (3 * 5 + 1, 4 * 5 + 1, 3) and grid[0, 0].tolist() == [255, 255, 255]
    assert grid[1, 1].tolist() == [128, 128, 128]  # 0 in [-1, 1] is mid-grey


@needs_shared
def test_fd_plumbing_with_an_untrained_classifier():
    torch.manual_seed(0)
    classifier = CifarClassifier().eval()
    recipe = C.cifar_recipe("edm", "smoke")
    ref = C.fd_reference(recipe, classifier)  # 1,000 test images of the class, 16 px seen at 32 px
    floor = C.fd_floor(recipe, 40, ref, classifier)
    noise = C.image_fd(torch.rand(40, 3, 16, 16) * 2 - 1, ref, classifier)
    assert 0 < floor < noise


@needs_shared
def test_cli_cifar_train_and_eval(tmp_path, capsys, monkeypatch):
    from fewstep_lab import metrics_images
    from fewstep_lab.cli import main

    edm, cd = tmp_path / "edm.pt", tmp_path / "cd.pt"
    common = ["--profile", "smoke", "--steps", "2", "--quiet", "--device", "cpu"]
    assert main(["cifar", "train", "--method", "edm", "--out", str(edm), *common]) == 0
    assert "1 process(es)) for 2 steps" in capsys.readouterr().out
    assert main(["cifar", "train", "--method", "cd", "--out", str(cd), *common]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert main(["cifar", "train", "--method", "cd", "--teacher", str(edm), "--out", str(cd), *common]) == 0
    torch.manual_seed(0)
    classifier = CifarClassifier().eval()  # untrained: the plumbing, not the number, is tested here
    monkeypatch.setattr(metrics_images, "load_fd_classifier", lambda device="cpu": classifier)
    assert main(["cifar", "eval", "--ckpt", str(cd), "--n", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "NFE   1" in out and "NFE   2" in out and "the floor" in out
